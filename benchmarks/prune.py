"""Pruning SmolLM2-135M: WikiText-2 perplexity, zero-shot accuracy, wall time and peak memory of every method.

Rows: dense, then magnitude, Wanda, SparseGPT, Wanda++ (RGS only), Wanda++ (RGS + RO) and Wanda's score + RO
(`wanda+ro`: Wanda++ with alpha 0) at each setting (50% unstructured, 2:4, 4:8). Each row runs in its own
subprocess (load, calibrate, reset the peak-RSS counter, prune, read the peak, evaluate), one after the other, so
times and memory are comparable within the run.

Protocol (defaults; every value is in the output's "protocol"):
  * calibration: 64 sequences x 512 tokens from ../shared/data/c4 (snippets joined by blank lines, seed 0);
  * Wanda++: alpha 100, RO 5 rounds x 8 inputs, RMSprop lr 2e-4 (tuned at 135M, see docs/pruning.md); the
    RO log is the free one (per-round training loss, error after RO before the final prune);
  * SparseGPT: blocksize 128, damping 0.01 mean(diag H);
  * perplexity: WikiText-2 raw test, windows of 512 tokens, the first 64 (32,768 tokens; the full test set at
    2048 is ~140 windows, too slow for two CPU cores);
  * zero-shot: piqa, arc_easy, arc_challenge, winogrande, openbookqa, boolq, rte, 200 seeded examples each
    (seed 0), scored as lm-evaluation-harness does (--zs-protocol lm-eval, the default: its prompts, acc and
    acc_norm, zolm.eval.zero_shot; docs/results.md shows it equals lm-eval) or by zolm's older protocol
    (--zs-protocol zolm: training templates, mean option log-probability, the figures of issue 6);
    "zero_shot_avg" is the mean acc, "zero_shot_norm" holds acc_norm where lm-eval reports it;
  * memory: peak RSS while pruning (VmHWM, reset once the model's weights are resident and the calibration ids
    built), the RSS at that point, their difference (what pruning adds), the two [N, L, H] activation buffers
    pruning keeps, and what holding every block's activations would take instead.

Reproduce:   .venv/bin/python benchmarks/prune.py                 (full protocol: a few hours on 2 cores)
             .venv/bin/python benchmarks/prune.py --quick         (smoke run: tiny sizes, minutes)
Options select subsets (--settings 2:4 --methods wanda,wanda++) and sizes (--nsamples, --zs-n, ...).
Prints ONE JSON line: {"benchmark": "prune", "protocol": ..., "table": [rows], "summary": ..., env}.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment, peak_mib, reset_peak, run_worker  # noqa: E402

SETTINGS = {"50%": {"sparsity": 0.5}, "2:4": {"nm": "2:4"}, "4:8": {"nm": "4:8"}}
METHODS = {"magnitude": {"method": "magnitude"}, "wanda": {"method": "wanda"},
           "sparsegpt": {"method": "sparsegpt"}, "wanda++rgs": {"method": "wanda++", "ro_rounds": 0},
           "wanda++": {"method": "wanda++"}, "wanda+ro": {"method": "wanda++", "alpha": 0.0}}
TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "boolq", "rte")
FULL = {"nsamples": 64, "seqlen": 512, "ro_rounds": 5, "ro_samples": 8, "ro_lr": 2e-4, "alpha": 100.0,
        "ro_stats": "steps", "ppl_seqlen": 512, "ppl_windows": 64, "zs_n": 200}
QUICK = {"nsamples": 8, "seqlen": 128, "ro_rounds": 2, "ro_samples": 4, "ro_lr": 1e-4, "alpha": 100.0,
         "ro_stats": "steps", "ppl_seqlen": 256, "ppl_windows": 4, "zs_n": 20}


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def worker(spec: dict) -> dict:
    import torch

    from zolm import models
    from zolm.blocks import decoder_blocks
    from zolm.data.calibration import calibration_ids
    from zolm.data.encode import encode_all
    from zolm.data.tasks import load_splits
    from zolm.eval.evaluate import evaluate_items
    from zolm.eval.perplexity import perplexity, read_wikitext
    from zolm.eval.zero_shot import evaluate_lm_eval, sample_rows
    from zolm.prune import PruneConfig, prune_

    p = spec["protocol"]
    model, tok = models.load(spec["model"])
    row: dict = {"method": spec["method"], "setting": spec["setting"]}
    if spec["method"] != "dense":
        knobs = {k: p[k] for k in ("ro_rounds", "ro_samples", "ro_lr", "alpha", "ro_stats") if k in p}
        config = PruneConfig(**{**knobs, **METHODS[spec["method"]], **SETTINGS[spec["setting"]]})
        calib = calibration_ids(tok, "c4", DATA, p["nsamples"], p["seqlen"], seed=0) \
            if config.needs_calibration else None
        with torch.no_grad():  # page the (memory-mapped) weights in, so the peak measures pruning, not loading
            for prm in model.parameters():
                float(prm.sum())
        base = _rss_mib()
        reset_peak()
        t0 = time.perf_counter()
        report = prune_(model, config, calib)
        row["prune_s"] = round(time.perf_counter() - t0, 2)
        row["peak_mib"] = round(peak_mib())
        row["loaded_rss_mib"] = round(base)  # interpreter + resident model + calibration ids
        row["peak_over_loaded_mib"] = row["peak_mib"] - row["loaded_rss_mib"]
        row["sparsity"] = round(report.sparsity, 5)
        errors = [b.rel_error for b in report.blocks if b.rel_error is not None]
        row["block_rel_error_mean"] = round(sum(errors) / len(errors), 5) if errors else None
        ro = [(b.details or {}).get("ro", []) for b in report.blocks]
        ro = [r for r in ro if r]
        if ro:  # per block: the first and last round's relative RO loss, and the error after RO (all inputs)
            row["ro_rounds_reducing_loss"] = f"{sum(r[-1]['rel_loss'] < r[0]['rel_loss'] for r in ro)}/{len(ro)}"
            row["ro_rel_loss_first_last"] = [round(sum(r[i]["rel_loss"] for r in ro) / len(ro), 5) for i in (0, -1)]
            row["ro_rel_error_mean"] = round(sum(b.details["rel_error_ro"] for b in report.blocks) / len(ro), 5)
        h = model.config.hidden_size
        buffer = p["nsamples"] * p["seqlen"] * h * 4 / 2**20
        row["activation_buffers_mib"] = round(2 * buffer) if config.needs_calibration else 0
        row["all_blocks_activations_mib"] = round(len(decoder_blocks(model)) * buffer)
    ids = torch.tensor(tok(read_wikitext(DATA / "wikitext2" / "wiki.test.raw"))["input_ids"], dtype=torch.long)
    t0 = time.perf_counter()
    row["wikitext2_ppl"] = round(perplexity(model, ids, p["ppl_seqlen"], p["ppl_windows"])["perplexity"], 3)
    accs, norms = {}, {}
    for task in p["tasks"]:
        if p.get("zs_protocol", "zolm") == "lm-eval":
            r = evaluate_lm_eval(model, tok, task, sample_rows(task, DATA, p["zs_n"], 0), 16)
            accs[task] = round(r["acc"], 4)
            if "acc_norm" in r:
                norms[task] = round(r["acc_norm"], 4)
            continue
        s = load_splits(task, DATA, num_train=0, num_dev=0, num_test=p["zs_n"], seed=0)
        accs[task] = round(evaluate_items(model, tok, encode_all(tok, s.test), s.task.kind, 16)["accuracy"], 4)
    row["zero_shot"] = accs
    if norms:
        row["zero_shot_norm"] = norms
    row["zero_shot_avg"] = round(sum(accs.values()) / len(accs), 4) if accs else None
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    return row


def summarize(table: list[dict]) -> dict:
    """Wanda++ against Wanda (relative perplexity change) and each method's time as a multiple of Wanda's."""
    by = {(r["method"], r["setting"]): r for r in table}
    out: dict = {}
    for setting in {r["setting"] for r in table if r["method"] != "dense"}:
        wanda = by.get(("wanda", setting))
        if wanda is None:
            continue
        s: dict = {}
        for m in (m for m in METHODS if m != "wanda"):
            if (m, setting) in by:
                r = by[(m, setting)]
                s[f"{m}_ppl_vs_wanda"] = round(r["wikitext2_ppl"] / wanda["wikitext2_ppl"] - 1, 4)
                s[f"{m}_time_x_wanda"] = round(r["prune_s"] / max(wanda["prune_s"], 1e-9), 2)
        out[setting] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny calibration and evaluation subsets")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"subset of {','.join(SETTINGS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row")
    ap.add_argument("--zs-protocol", choices=("lm-eval", "zolm"), default="lm-eval",
                    help="zero-shot scoring: lm-eval's (default) or zolm's older protocol (issue 6's figures)")
    for key, value in FULL.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, help=f"default {value}")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    protocol = dict(QUICK if args.quick else FULL)
    protocol.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    protocol["tasks"] = list(TASKS) if protocol["zs_n"] > 0 else []  # --zs-n 0: perplexity only
    protocol["calibration"] = "c4"
    protocol["zs_protocol"] = args.zs_protocol
    settings = [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    bad = [x for x in settings if x not in SETTINGS] + [x for x in methods if x not in METHODS]
    if bad:
        ap.error(f"unknown setting/method: {', '.join(bad)}")
    jobs = ([] if args.no_dense else [("dense", "-")]) + [(m, s) for s in settings for m in methods]
    table = []
    t0 = time.perf_counter()
    for method, setting in jobs:
        spec = {"model": args.model, "method": method, "setting": setting, "protocol": protocol}
        row = run_worker(__file__, json.dumps(spec), timeout=6 * 3600)
        print(f"[{time.perf_counter() - t0:7.0f} s] {method:>10} {setting:>3}: ppl {row['wikitext2_ppl']}, "
              f"zero-shot {row['zero_shot_avg']}, prune {row.get('prune_s', 0)} s", file=sys.stderr, flush=True)
        table.append(row)
    print(json.dumps({"benchmark": "prune", "model": args.model, "quick": args.quick, "protocol": protocol,
                      "table": table, "summary": summarize(table), "total_s": round(time.perf_counter() - t0),
                      **environment()}), flush=True)


if __name__ == "__main__":
    main()
