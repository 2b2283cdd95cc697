"""Compress, then recover: dense -> 2:4 pruning -> INT4 -> QuZO on SST-2, with Wanda vs Wanda++ pruning.

For each pruner (wanda, wanda++) it runs the recipe pipeline (``zolm.pipeline.run_recipe``, the code behind
``zolm run``) with the stages prune (2:4, C4 calibration) -> quantize (INT4, groups of 32, embeddings INT8)
-> finetune (QuZO on SST-2), and reports after every stage (stage 0 = the dense model): SST-2 test accuracy,
WikiText-2 perplexity, sparsity, on-disk size of the saved model, wall time and the peak resident memory of
the stage (VmHWM, reset before each stage). The quantize row is "without recovery", the finetune row "with".
A third run fine-tunes the dense model with MeZO (same steps, batch and data) as the reference the recovered
model is compared with. Last, it checks that the recovered model keeps exactly the pruned zeros (every pruned
weight is still zero, no other weight is) and that every weight is a grid value (integer code in [-8, 7]
times its group scale), and draws ``pipeline.png`` (accuracy and perplexity per stage).

Reproduce:  .venv/bin/python benchmarks/pipeline.py --out runs/bench/pipeline-runs      (about 25 min)
            .venv/bin/python benchmarks/pipeline.py --quick                           (smoke run)
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment, peak_mib, reset_peak  # noqa: E402


def recipe(args, out: Path, pruner: str | None):
    """The stages of one run: the recovery pipeline for ``pruner``, or dense MeZO when it is None."""
    from zolm.pipeline import Recipe

    report = {"tasks": ["sst2"], "num_test": args.num_test, "perplexity": "wikitext2", "seq_len": 512,
              "max_windows": args.ppl_windows}
    train = {"task": "sst2", "steps": args.steps, "batch_size": args.batch_size, "num_dev": args.num_dev,
             "num_test": args.num_test, "eval_every": max(args.steps // 2, 1), "eval_before": False}
    if pruner is None:
        stages = [("finetune", {**train, "method": "mezo", "lr": args.mezo_lr})]
    else:
        stages = [("prune", {"method": pruner, "nm": "2:4", "calib": "c4", "nsamples": args.nsamples,
                             "seqlen": args.seqlen}),
                  ("quantize", {"bits": 4, "group_size": 32, "embed_bits": 8}),
                  ("finetune", {**train, "method": "quzo", "lr": args.quzo_lr})]
    return Recipe(model=args.model, out=str(out), stages=stages, data_dir=str(DATA), report=report)


def run(args, out: Path, pruner: str | None) -> list[dict]:
    """Run one recipe; each stage's summary gets the peak RSS of the stage and its model's on-disk bytes."""
    from zolm.pipeline import run_recipe

    peaks: list[float] = []

    def echo(line: str) -> None:  # called once after each stage: the peak since the previous one is its own
        print(f"# {pruner or 'dense'} {line}", file=sys.stderr, flush=True)
        peaks.append(round(peak_mib()))
        reset_peak()

    reset_peak()
    rows = run_recipe(recipe(args, out, pruner), overwrite=True, echo=echo)
    for row, peak in zip(rows, peaks):
        row["peak_mib"] = peak
    return rows


def check_recovered(pruned_dir: Path, final_dir: Path) -> dict:
    """Pruned pattern kept exactly and every weight on its INT4 grid, layer by layer (the issue's check).

    ``exact_mask``: the stored pruning mask equals the pruned model's non-zeros and every pruned weight is still
    zero. Rounding to INT4 may zero a few small kept weights too; they are counted apart (``extra_zeros``).
    """
    from zolm import models
    from zolm.quant.linear import QuantLinear
    from zolm.utils.sparse import unpack_mask

    pruned, _ = models.load(str(pruned_dir))
    final, _ = models.load(str(final_dir))
    ref = dict(pruned.named_modules())
    layers = exact = on_grid = extra = 0
    for name, mod in final.named_modules():
        if not isinstance(mod, QuantLinear) or mod.sparsity_mask is None:
            continue
        w, kept = mod.dequantize().float(), ref[name].weight != 0
        layers += 1
        mask = unpack_mask(mod.sparsity_mask, w.numel()).view(w.shape)
        exact += bool(torch.equal(mask, kept) and not w[~kept].any())
        extra += int((w[kept] == 0).sum())
        codes = w / mod.scale.repeat_interleave(w.shape[1] // mod.scale.shape[1], dim=1)
        ints = codes.round()
        on_grid += bool((codes - ints).abs().max() < 1e-3 and ints.min() >= -8 and ints.max() <= 7)
    return {"pruned_layers": layers, "layers_with_exact_mask": exact, "layers_on_int4_grid": on_grid,
            "extra_zeros_from_rounding": extra}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        labels = [r["stage"] for r in rows]
        a1.plot(labels, [r["sst2"] for r in rows], marker="o", label=name)
        a2.plot(labels, [r["perplexity"] for r in rows], marker="o", label=name)
    a1.set_title("SST-2 test accuracy")
    a2.set_title("WikiText-2 perplexity")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    ap.add_argument("--pruners", default="wanda,wanda++")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quzo-lr", type=float, default=1e-5)
    ap.add_argument("--mezo-lr", type=float, default=3e-5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--num-dev", type=int, default=100)
    ap.add_argument("--num-test", type=int, default=200)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense MeZO reference")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.nsamples, args.seqlen = 2, 4, 4, 64
        args.num_dev, args.num_test, args.ppl_windows = 8, 16, 2
    root = args.out or Path(tempfile.mkdtemp(prefix="zolm-pipeline-"))
    results = {}
    for pruner in args.pruners.split(","):
        results[pruner] = run(args, root / pruner, pruner)
    checks = {p: check_recovered(root / p / "1-prune" / "model", root / p / "3-finetune" / "run" / "model")
              for p in results}
    dense = None if args.no_dense else run(args, root / "dense-mezo", None)
    plot(results, root / "pipeline.png")
    summary = {p: {"recovered_accuracy": rows[-1]["sst2"],
                   "unrecovered_accuracy": rows[-2]["sst2"],
                   "recovered_perplexity": rows[-1]["perplexity"], "dense_perplexity": rows[0]["perplexity"]}
               for p, rows in results.items()}
    if dense:
        for s in summary.values():
            s["dense_finetuned_accuracy"] = dense[-1]["sst2"]
    print(json.dumps({"benchmark": "pipeline", "model": args.model, "quick": args.quick,
                      "protocol": {k: v for k, v in vars(args).items() if k != "quick"} | {"out": str(root)},
                      "stages": results, "dense_mezo": dense, "checks": checks, "summary": summary,
                      "plot": str(root / "pipeline.png"), **environment()}, default=str))


if __name__ == "__main__":
    main()
