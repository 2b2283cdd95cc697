"""Tune Wanda++'s regional-optimisation learning rate: block output error after RO for a grid of rates.

The paper's RMSprop lr (3e-7) was tuned for LLaMA-7B; papers.md 8.5 asks to re-tune it per model and to check
that RO lowers each block's output error. For a few blocks of the model (inputs from the dense upstream
blocks, C4 calibration), this runs Wanda++ on a copy of the block once without RO (RGS only) and once per
learning rate, and reports ||Y - Y_dense||^2 / ||Y_dense||^2 over all calibration inputs after the final
re-prune, plus the mean per-round error before/after the RO steps.

Reproduce:  .venv/bin/python benchmarks/prune_ro_lr.py                       (blocks 0,10,20,29; 2:4; ~10 min)
            .venv/bin/python benchmarks/prune_ro_lr.py --pattern 0.5 --lrs 1e-6,1e-5
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,10,20,29")
    ap.add_argument("--pattern", default="2:4", help="N:M or an unstructured ratio")
    ap.add_argument("--lrs", default="3e-7,1e-6,3e-6,1e-5,3e-5,1e-4,2e-4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ro-samples", type=int, default=8)
    ap.add_argument("--ro-rounds", type=int, default=5)
    args = ap.parse_args()

    from zolm import models
    from zolm.blocks import capture_block_inputs, decoder_blocks, linear_layers
    from zolm.data.calibration import calibration_ids
    from zolm.prune.calibrate import forward_all
    from zolm.prune.masks import parse_nm
    from zolm.prune.regional import wanda_pp_block_

    nm = parse_nm(args.pattern) if ":" in args.pattern else None
    sparsity = 1 - nm[0] / nm[1] if nm else float(args.pattern)
    model, tok = models.load(args.model)
    inputs = capture_block_inputs(model, calibration_ids(tok, "c4", DATA, args.nsamples, args.seqlen, seed=0))
    wanted = [int(b) for b in args.blocks.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    rows = []
    t0 = time.perf_counter()
    for i, block in enumerate(decoder_blocks(model)):
        if i > max(wanted):
            break
        if i in wanted:
            row: dict = {"block": i}
            for lr in [0.0, *lrs]:
                b = copy.deepcopy(block)
                dense = torch.empty_like(inputs.hidden)
                info = wanda_pp_block_(b, linear_layers(b), inputs, dense, sparsity=sparsity, nm=nm, alpha=100.0,
                                       rounds=0 if lr == 0 else args.ro_rounds, samples=args.ro_samples, lr=lr,
                                       generator=torch.Generator().manual_seed(0), log_errors=True, batch_size=8)
                err = forward_all(b, inputs, 8, reference=dense)
                key = "rgs_only" if lr == 0 else f"lr={lr:g}"
                row[key] = round(err, 6)
                if info["ro"]:
                    row[key + "_rounds"] = [[round(r["rel_error_before"], 6), round(r["rel_error_after"], 6)]
                                            for r in info["ro"]]
                if lr == 0:
                    row["grad_norm_ratio"] = {k: round(v, 3) for k, v in info["grad_norm_ratio"].items()}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        forward_all(block, inputs, 8, out=inputs.hidden)  # dense propagation to the next block
    print(json.dumps({"benchmark": "prune_ro_lr", "model": args.model, "pattern": args.pattern,
                      "nsamples": args.nsamples, "seqlen": args.seqlen, "ro_samples": args.ro_samples,
                      "ro_rounds": args.ro_rounds, "rows": rows, "total_s": round(time.perf_counter() - t0),
                      **environment()}))


if __name__ == "__main__":
    main()
