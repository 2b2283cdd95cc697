"""How a ZO run's expected descent per step evolves: exact gradient norms along MeZO-LoRA's and AdaZeta's paths.

A one-query SPSA step moves the expected loss by -lr ||g||^2 to first order (papers.md 1.1), g the gradient of
the training objective over the trained set. This replays finished ``benchmarks/adazeta.py`` runs to their budget
milestones (weights rebuilt from the replay log, bit-identical to training) and, at each, backpropagates the
training objective over a fixed set of training examples to get

* ``grad_norm_sq``: ||g||^2 over the trained set, and per group of parameters (LoRA ``lora_A`` / ``lora_B``; TT
  ``down`` / ``up`` cores and biases), layer indices folded;
* ``descent_per_step``: lr_t ||g||^2, the first-order expected loss change of one step at that point;
* ``loss``: the objective on those examples.

It answers what the SST-2 comparison left open: does MeZO-LoRA overtake AdaZeta late because its gradient grows
as B grows from zero (dL/dA is proportional to B), while AdaZeta's shrinks?

Reproduce (seed 0 of the SST-2 comparison, 4,096 forwards, ~8 + ~5 min on 2 cores):
    .venv/bin/python benchmarks/adazeta.py --tasks sst2 --methods mezo-lora,adazeta-fixed --num-val 200 \\
        --num-test 500 --no-memory --no-alignment --out runs/adazeta-s0
    .venv/bin/python benchmarks/adazeta_gradnorm.py --runs runs/adazeta-s0/sst2 --num-grad 64
Prints one JSON line; writes <runs>/gradnorm.json and <runs>/gradnorm.png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment  # noqa: E402
from adazeta import logged_config, replayed  # noqa: E402


def group_of(name: str) -> str:
    """A parameter's group with layer indices folded: ``...layers.3.self_attn.q_proj.lora_A.default.weight`` ->
    ``q_proj.lora_A``; ``...layers.3.mlp.up_proj.tt_adapter.up.core_5`` -> ``mlp.up_proj.tt_adapter.up.core_5``."""
    name = re.sub(r"\.default\b", "", re.sub(r"^.*layers\.\d+\.", "", name))
    name = re.sub(r"\.weight$", "", name)
    parts = name.split(".")
    return ".".join(parts[-2:]) if "lora_" in name else ".".join(p for p in parts if p != "self_attn")


def gradient_sq_norms(method, batches: list[dict], kind: str) -> tuple[float, dict[str, float], float]:
    """||g||^2 of the mean training objective over ``batches`` (equal sizes), per group, and the objective."""
    from zolm.eval.scoring import task_loss

    params = method.params
    model = method.model
    model.eval()
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params.params]
    for p in params.params:
        p.requires_grad_(True)
    loss = 0.0
    try:
        for b in batches:
            value = task_loss(model, b, kind) / len(batches)
            for g, d in zip(grads, torch.autograd.grad(value, params.params)):
                g.add_(d.double())
            loss += float(value.detach())
    finally:
        for p in params.params:
            p.requires_grad_(False)
    groups: dict[str, float] = {}
    for name, g in zip(params.names, grads):
        key = group_of(name)
        groups[key] = groups.get(key, 0.0) + float((g**2).sum())
    return sum(groups.values()), groups, loss


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="a task folder of benchmarks/adazeta.py's output (method folders)")
    ap.add_argument("--methods", default="mezo-lora,adazeta-fixed")
    ap.add_argument("--num-grad", type=int, default=64, help="training examples the gradient is taken over")
    ap.add_argument("--points", type=int, default=6, help="milestones after step 0")
    args = ap.parse_args(argv)

    from zolm import models
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.train.loop import lr_at
    from zolm.utils.io import atomic_write_json, read_jsonl

    runs, t0, out = Path(args.runs), time.time(), {}
    for name in args.methods.split(","):
        run_dir = runs / name
        if not (run_dir / "replay.jsonl").is_file():
            raise SystemExit(f"no replay log in {run_dir}: run benchmarks/adazeta.py first (see --help)")
        config, _ = logged_config(run_dir)
        budget = max(r["forward_passes"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r)
        milestones = [round(budget * k / args.points) for k in range(args.points + 1)]
        split = load_splits(config.tasks[0], DATA, config.num_train, 0, 0, config.data_seed)  # its training examples
        tok = models.load_tokenizer(config.model)
        items = encode_all(tok, split.train[:args.num_grad], config.max_length)
        bs = config.batch_size
        batches = [training_batch(items[i:i + bs], split.task.kind, tok.pad_token_id)
                   for i in range(0, len(items), bs)]
        points = []
        for step, fwd, method, _ in replayed(run_dir, milestones):
            total, groups, loss = gradient_sq_norms(method, batches, split.task.kind)
            lr = lr_at(config, step + 1)
            points.append({"step": step, "forward_passes": fwd, "loss": round(loss, 4), "grad_norm_sq": total,
                           "lr": lr, "descent_per_step": lr * total,
                           "groups": {k: round(v, 6) for k, v in sorted(groups.items())}})
            print(f"{name} step {step} fwd {fwd}: loss {loss:.4f} |g|^2 {total:.4g} lr|g|^2 {lr * total:.4g}",
                  file=sys.stderr, flush=True)
        out[name] = {"lr": config.optim.lr, "trainable": method.params.numel(), "points": points}
    summary = {"benchmark": "adazeta_gradnorm", "runs": str(runs), "num_grad": args.num_grad, "results": out,
               "wall_s": round(time.time() - t0), **environment()}
    atomic_write_json(runs / "gradnorm.json", summary)
    plot(out, runs / "gradnorm.png")
    print(json.dumps(summary), flush=True)


def plot(results: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zolm.utils.io import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=110)
    for name, r in results.items():
        x = [p["forward_passes"] for p in r["points"]]
        axes[0].semilogy(x, [p["grad_norm_sq"] for p in r["points"]], "o-", label=name)
        axes[1].semilogy(x, [max(p["descent_per_step"], 1e-12) for p in r["points"]], "o-", label=name)
    axes[0].set_ylabel("||g||^2 over the trained set")
    axes[1].set_ylabel("lr ||g||^2 (expected descent / step)")
    for ax in axes:
        ax.set_xlabel("forward passes (examples)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    main()
