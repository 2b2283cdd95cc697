"""AdaZeta vs MeZO-LoRA over several seeds: is the forward-pass gap beyond the seed-to-seed spread?

Runs ``benchmarks/adazeta.py`` once per seed (each seed draws its own training / validation / test examples
and its own perturbations) and aggregates, per task and method: the final validation loss, the forward passes
to reach MeZO-LoRA's final validation loss (``to_final``) as a ratio of MeZO-LoRA's budget, and the test
accuracy, each as mean +- standard error over seeds (s.e. = sample standard deviation / sqrt(n)).

Reproduce:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adazeta_seeds.py --seeds 0,1,2 --tasks sst2 \\
                --methods adazeta-fixed --num-val 200 --num-test 500      (~25 min per seed on one core)
Options after ``--`` go to adazeta.py unchanged. Writes <out>/seed<N>/results.json (one per seed, reused when
present with the same scale: delete it to rerun) and <out>/summary.json; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from zolm.utils.io import atomic_write_json


def mean_se(xs: list[float]) -> dict:
    """Mean and standard error (sample sd / sqrt(n); None for a single value) of the finite values."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"mean": None, "se": None, "n": 0}
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else None
    return {"mean": round(m, 4), "se": None if se is None else round(se, 4), "n": len(xs)}


def aggregate(per_seed: list[dict]) -> dict:
    """Per task and method, over seeds: final val loss, to_final / budget (never reached: counted as > 1), test."""
    out: dict = {}
    for task in per_seed[0]["results"]:
        out[task] = {}
        for method in per_seed[0]["results"][task]:
            rows = [s["results"][task][method] for s in per_seed]
            budget = [s["results"][task]["mezo-lora"]["forward_passes"] for s in per_seed]
            ratios = [None if r["to_final"] is None else r["to_final"]["forward_passes"] / b
                      for r, b in zip(rows, budget)]
            out[task][method] = {
                "final_val_loss": mean_se([r["curve"][-1]["val_loss"] for r in rows]),
                "best_val_loss": mean_se([min(p["val_loss"] for p in r["curve"][1:]) for r in rows]),
                "start_val_loss": mean_se([r["curve"][0]["val_loss"] for r in rows]),
                "to_final_ratio": ratios,
                "reached_half": sum(1 for x in ratios if x is not None and x <= 0.5),
                "acc_before": mean_se([r["acc_before"] for r in rows]),
                "acc_after": mean_se([r["acc_after"] for r in rows]),
                "curves": [[round(p["val_loss"], 4) for p in r["curve"]] for r in rows]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="sst2")
    ap.add_argument("--methods", default="adazeta-fixed", help="compared with mezo-lora, which always runs")
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--out", default="runs/adazeta-seeds")
    args, rest = ap.parse_known_args()
    rest = [a for a in rest if a != "--"]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    out, t0, per_seed = Path(args.out), time.time(), []
    methods = ",".join(["mezo-lora"] + [m for m in args.methods.split(",") if m != "mezo-lora"])
    script = str(Path(__file__).resolve().parent / "adazeta.py")
    for seed in seeds:
        seed_out = out / f"seed{seed}"
        cmd = [sys.executable, script, "--seed", str(seed), "--tasks", args.tasks, "--methods", methods,
               "--num-val", str(args.num_val), "--num-test", str(args.num_test), "--out", str(seed_out),
               "--no-memory", "--no-alignment", *rest]
        done = seed_out / "results.json"
        prev = json.loads(done.read_text()) if done.exists() else None
        if prev is None or prev.get("argv") != cmd[2:]:
            print(f"seed {seed}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            res = json.loads(done.read_text())
            res["argv"] = cmd[2:]
            atomic_write_json(done, res)
            prev = res
        per_seed.append(prev)
    summary = {"benchmark": "adazeta_seeds", "seeds": seeds, "scale": per_seed[0]["scale"],
               "results": aggregate(per_seed), "wall_s": round(time.time() - t0),
               "seed_wall_s": [s["wall_s"] for s in per_seed]}
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
