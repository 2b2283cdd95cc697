"""Where Wanda++'s time goes in one decoder block, against Wanda's on the same block (same process, back to back).

For each chosen block (inputs from the dense upstream blocks, C4 calibration) this runs, on fresh copies of the
block: Wanda (dense pass with statistics, mask, propagation pass), then Wanda++ with its phases timed by wrapping
the functions of ``zolm.prune.regional`` (regional gradients, re-prune statistics, masks, RO steps, diagnostic
passes) and the propagation pass. Ratios are measured within this one run, so machine load affects both sides.

Reproduce:  .venv/bin/python benchmarks/prune_profile.py                      (blocks 0,15; 32 x 256; ~2 min)
            .venv/bin/python benchmarks/prune_profile.py --blocks 3 --repeat 2
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment  # noqa: E402

PHASES = ("regional_gradients", "collect_stats", "prune_rgs_", "optimize_round_", "forward_all", "ro_steps_")


def _timed(module, name: str, acc: dict, depth: list) -> None:
    """Replace ``module.name`` by a wrapper adding its wall time to ``acc[name]`` (outermost wrapped call only:
    a ``forward_all`` inside ``collect_stats`` counts as ``collect_stats``)."""
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                acc[name] += time.perf_counter() - t0
    setattr(module, name, wrapper)


def _step_breakdown(block, inputs, dense, steps: int = 8) -> dict:
    """Seconds per single-sequence RO step split into forward, backward and the RMSprop step, and per RGS sample
    (forward + backward of the output norm), on a copy of the block."""
    from zolm.blocks import linear_layers, run_block

    b = copy.deepcopy(block).float()
    weights = [m.weight for m in linear_layers(b).values()]
    for p in b.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.RMSprop(weights, lr=1e-4)
    t = defaultdict(float)
    with torch.enable_grad():
        for i in range(steps):
            t0 = time.perf_counter()
            y = run_block(b, inputs, inputs.hidden[i:i + 1])
            loss = (y - dense[i:i + 1]).pow(2).sum()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            t["fwd"] += t1 - t0
            t["bwd"] += t2 - t1
            t["opt"] += t3 - t2
        for i in range(steps):
            t0 = time.perf_counter()
            y = run_block(b, inputs, inputs.hidden[i:i + 1])
            t1 = time.perf_counter()
            torch.autograd.grad(y.norm(), weights)
            t["rgs_fwd"] += t1 - t0
            t["rgs_bwd"] += time.perf_counter() - t1
    with torch.no_grad():
        t0 = time.perf_counter()
        for i in range(steps):
            run_block(b, inputs, inputs.hidden[i:i + 1])
        t["nograd_fwd_b1"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, steps, 8):
            run_block(b, inputs, inputs.hidden[i:i + 8])
        t["nograd_fwd_b8"] = time.perf_counter() - t0
    return {k: round(v / steps * 1000, 2) for k, v in t.items()}  # ms per sequence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,15")
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from zolm import models
    from zolm.blocks import capture_block_inputs, decoder_blocks, linear_layers
    from zolm.data.calibration import calibration_ids
    from zolm.prune import PruneConfig, calibrate, regional
    from zolm.prune.api import _wanda_block_, _wanda_pp_block_

    model, tok = models.load(args.model)
    model.eval()
    calib = calibration_ids(tok, "c4", DATA, args.nsamples, args.seqlen, seed=0)
    cfg_w = PruneConfig(method="wanda", nm=args.nm)
    cfg_p = PruneConfig(method="wanda++", nm=args.nm)
    acc: dict = defaultdict(float)
    depth = [0]
    for name in PHASES:
        if hasattr(regional, name):
            _timed(regional, name, acc, depth)
    wanted = [int(b) for b in args.blocks.split(",")]
    rows = []
    with torch.no_grad():
        inputs = capture_block_inputs(model, calib)
        blocks = decoder_blocks(model)
        for i, block in enumerate(blocks):
            if i > max(wanted):
                break
            if i in wanted:
                for _ in range(args.repeat):
                    row: dict = {"block": i}
                    for method, cfg in (("wanda", cfg_w), ("wanda++", cfg_p)):
                        b = copy.deepcopy(block)
                        work = copy.copy(inputs)
                        work.hidden = inputs.hidden.clone()
                        dense = torch.empty_like(work.hidden)
                        acc.clear()
                        t0 = time.perf_counter()
                        if method == "wanda":
                            _wanda_block_(cfg, b, linear_layers(b), work, dense)
                        else:
                            _wanda_pp_block_(cfg, torch.Generator().manual_seed(0), b, linear_layers(b), work, dense)
                        t1 = time.perf_counter()
                        rel = calibrate.forward_all(b, work, cfg.batch_size, out=work.hidden, reference=dense)
                        t2 = time.perf_counter()
                        row[method] = {"total_s": round(t2 - t0, 3), "method_s": round(t1 - t0, 3),
                                       "propagate_s": round(t2 - t1, 3), "rel_error": round(rel, 5),
                                       **({k: round(v, 3) for k, v in acc.items()} if method == "wanda++" else {})}
                    row["per_sequence_ms"] = _step_breakdown(block, inputs, dense)
                    row["ratio"] = round(row["wanda++"]["total_s"] / row["wanda"]["total_s"], 2)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            calibrate.forward_all(block, inputs, 8, out=inputs.hidden)
    print(json.dumps({"benchmark": "prune_profile", "nm": args.nm, "nsamples": args.nsamples,
                      "seqlen": args.seqlen, "config": cfg_p.to_dict(), "rows": rows, **environment()}))


if __name__ == "__main__":
    main()
