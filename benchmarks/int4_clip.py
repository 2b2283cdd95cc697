"""INT4 (groups of 32) starting point with absmax vs clipped scales: weight error and WikiText-2 perplexity.

    .venv/bin/python benchmarks/int4_clip.py [--windows 16] [--seq-len 256] [--nsamples 32] [--calib-seqlen 256]

Prints one JSON line: per scale search (none = absmax, mse = per-group clipping ratio minimising the weight error,
act = the same search on the error weighted by each input's mean square on C4 calibration text, llama.cpp's
imatrix; zolm.quant.primitives.compute_scales), the relative RMS error of the block linear weights, the
perplexity, and the float model's perplexity on the same windows (WikiText-2 *test*; the calibration is C4, so it
never sees the evaluation text). All in one process (ratios only are comparable across machines).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=32, help="clip act: C4 calibration sequences")
    ap.add_argument("--calib-seqlen", type=int, default=256, help="clip act: tokens per calibration sequence")
    args = ap.parse_args()
    t_start = time.perf_counter()
    from zolm import models
    from zolm.data.calibration import calibration_ids
    from zolm.eval.perplexity import perplexity, read_wikitext
    from zolm.quant.calibrate import input_importance
    from zolm.quant.linear import QuantLinear, quantize_
    from zolm.train.parts import BaseWeights

    model, tok = models.load(args.model)
    text = read_wikitext(DATA / "wikitext2" / "wiki.test.raw")
    ids = tok(text, return_tensors="pt").input_ids[0]
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n}
    out = {"model": args.model, "windows": args.windows, "seq_len": args.seq_len,
           "float": round(perplexity(model, ids, args.seq_len, args.windows)["perplexity"], 3)}
    for clip in ("none", "mse", "act"):
        m, _ = models.load(args.model)
        t0 = time.perf_counter()
        importance = None if clip != "act" else input_importance(
            m, calibration_ids(tok, "c4", DATA, args.nsamples, args.calib_seqlen))
        quantize_(m, BaseWeights(kind="low-bit", bits=4, clip=clip).quant_config(), importance=importance)
        secs = time.perf_counter() - t0
        num = den = 0.0
        for n, q in m.named_modules():
            if isinstance(q, QuantLinear) and n in dense:
                num += float((q.dequantize() - dense[n]).pow(2).sum())
                den += float(dense[n].pow(2).sum())
        ppl = perplexity(m, ids, args.seq_len, args.windows)["perplexity"]
        out[clip] = {"weight_rel_rms_error": round((num / den) ** 0.5, 5), "perplexity": round(ppl, 3),
                     "quantize_s": round(secs, 1)}
    out["wall_s"] = round(time.perf_counter() - t_start)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
