"""Cost of one zeroth-order step against two forward passes, and peak memory of ZO vs inference vs AdamW.

For each shape (batch x sequence) it measures, each in its own subprocess:
  * forward: the loss forward (option-token loss on the last token) alone;
  * zolm: zolm's MeZO step (counter-based z, C kernel, restore fused with the update: 3 passes);
  * reference: a MeZO step written as the MeZO paper's code does it (torch.manual_seed + torch.normal per
    parameter, four passes: +eps, -2eps, +eps, update);
  * peak resident memory (VmHWM, reset after the model is loaded) of inference, of a zolm ZO step and of a
    first-order AdamW step on the same batch.
Each timing process interleaves forwards with steps and reports median(step) / (2 * median(forward)), so
machine noise hits numerator and denominator alike.

Then one more line (benchmarks/zo_half.py) for bfloat16 weights: the update error ratio (error RMS / intended RMS
over 100 steps), peak memory and step cost of each half_mode (exact, lean, inplace).

Reproduce:  .venv/bin/python benchmarks/zo_step.py            (SmolLM2-135M, shapes 16x64 and 8x128, then bf16)
            .venv/bin/python benchmarks/zo_step.py --shapes 16x64 --reps 3 --half-dtype none
Prints one JSON line per shape, and the half-precision line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import environment, peak_mib, reset_peak, run_worker  # noqa: E402


def make_batch(model, batch: int, seq: int) -> dict:
    from zolm.data.encode import collate

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, seq), generator=g).tolist()
    return collate(ids, [1] * batch, pad_id=0)


def reference_perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """MeZO's zo_perturb_parameters: reseed, then one torch.normal draw per parameter, in order."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + scale * z


def reference_step(params: list[torch.Tensor], loss, seed: int, eps: float, lr: float) -> None:
    """One MeZO step as MeZO's code takes it: four regenerations of z (+eps, -2 eps, +eps, update)."""
    reference_perturb(params, seed, eps)
    lp = loss()
    reference_perturb(params, seed, -2 * eps)
    lm = loss()
    reference_perturb(params, seed, eps)
    reference_perturb(params, seed, -lr * (lp - lm) / (2 * eps))


def interleaved(loss, step_fn, reps: int, first: int = 2) -> tuple[float, float]:
    """(median forward, median step) over ``reps`` forward / step pairs (steps ``first`` .. first+reps-1)."""
    fwd, steps = [], []
    for r in range(reps):
        t = time.perf_counter()
        loss()
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        step_fn(first + r)
        steps.append(time.perf_counter() - t)
    return statistics.median(fwd), statistics.median(steps)


def worker(mode: str, model_name: str, batch: int, seq: int, reps: int) -> dict:
    from zolm import models
    from zolm.eval.scoring import task_loss
    from zolm.zo.optimizer import ZOConfig, ZOOptimizer
    from zolm.zo.spsa import ParamSet

    model, _ = models.load(model_name)
    b = make_batch(model, batch, seq)
    for p in model.parameters():
        p.requires_grad_(mode == "fo_peak")

    def loss() -> float:
        with torch.inference_mode():
            return float(task_loss(model, b, "multiple_choice"))

    lr, eps = 1e-7, 1e-3
    if mode in ("infer_peak", "zo_peak", "fo_peak"):
        loss()  # warm-up: first-call allocations are not part of the steady state
        if mode == "fo_peak":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        else:
            opt = ZOOptimizer(ParamSet(model, include=[".*"]), ZOConfig(eps=eps))
        reset_peak()
        for step in range(1, 4):
            if mode == "infer_peak":
                loss()
            elif mode == "zo_peak":
                opt.step(loss, step, lr)
            else:
                model.train()
                task_loss(model, b, "multiple_choice").backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return {"mode": mode, "peak_mib": peak_mib()}

    params = [p for _, p in model.named_parameters()]
    zo = ZOOptimizer(ParamSet(model, include=[".*"]), ZOConfig(eps=eps))

    def zolm_step(step: int) -> None:
        zo.step(loss, step, lr)

    def ref_step(step: int) -> None:
        reference_step(params, loss, 1000 + step, eps, lr)

    step_fn = {"zolm": zolm_step, "reference": ref_step}[mode]
    loss()
    step_fn(1)  # warm-up (page faults, kernel build/load)
    f, s = interleaved(loss, step_fn, reps)
    return {"mode": mode, "fwd_s": f, "step_s": s, "step_over_2fwd": s / (2 * f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=5, metavar=("MODE", "MODEL", "BATCH", "SEQ", "REPS"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shapes", default="16x64,8x128")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--half-dtype", default="bfloat16", choices=["bfloat16", "float16", "none"],
                    help="also print the half-precision line (benchmarks/zo_half.py) for this dtype")
    args = ap.parse_args()
    if args.worker:
        mode, model, batch, seq, reps = args.worker
        print(json.dumps(worker(mode, model, int(batch), int(seq), int(reps))))
        return
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        def w(mode: str, batch: int = batch, seq: int = seq) -> dict:
            return run_worker(__file__, mode, args.model, str(batch), str(seq), str(args.reps))

        zolm, ref = w("zolm"), w("reference")
        infer, zo, fo = w("infer_peak"), w("zo_peak"), w("fo_peak")
        print(json.dumps({
            "benchmark": "zo_step", "model": args.model, "batch": batch, "seq": seq,
            "step_over_2fwd": round(zolm["step_over_2fwd"], 3), "ref_step_over_2fwd": round(ref["step_over_2fwd"], 3),
            "zo_peak_over_infer": round(zo["peak_mib"] / infer["peak_mib"], 3),
            "fo_peak_over_zo": round(fo["peak_mib"] / zo["peak_mib"], 3),
            "fwd_s": round(zolm["fwd_s"], 3), "zolm_step_s": round(zolm["step_s"], 3),
            "ref_step_s": round(ref["step_s"], 3), "infer_peak_mib": round(infer["peak_mib"]),
            "zo_peak_mib": round(zo["peak_mib"]), "fo_peak_mib": round(fo["peak_mib"]), **environment()}),
            flush=True)
    if args.half_dtype != "none":
        from zo_half import half_line

        here = __import__("pathlib").Path(__file__).resolve().parent
        print(json.dumps(half_line(args.model, args.half_dtype, script=str(here / "zo_half.py"))), flush=True)


if __name__ == "__main__":
    main()
