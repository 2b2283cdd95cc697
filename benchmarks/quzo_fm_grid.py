"""What a fixed quantization grid does to a ZO perturbation (QuZO's float-master regime, ``quzo-fm``).

The forward of ``quzo-fm`` sees Q(W + eps u), rounded to nearest on fixed scales. With a grid step s much larger
than eps, only the weights within eps |u| of a rounding boundary move, each by a whole step s: the perturbation the
loss difference measures is d = Q(W + eps u) - Q(W), not eps u. This prints, over SmolLM2's block linear weights
and one Gaussian u per weight (the 4-bit levels of QuZO's perturbation have the same scale), the share of weights
d moves, ||d|| / ||eps u|| and cos(d, u) for INT4-g32 and INT8 (the scales ``quzo-fm`` uses):
g_hat = (L(W + d) - L(W - d)) / (2 eps) then weighs a direction only cos(d, u) aligned with u, with ||d|| / (eps ||u||)
times the magnitude, i.e. an estimate whose noise is amplified by about (||d|| / ||eps u||)^2 against MeZO's
at the same learning rate.

Reproduce:  .venv/bin/python benchmarks/quzo_fm_grid.py [--eps 1e-3,2e-3]     (about a minute; one JSON line)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402


def grid_effect(model, bits: int, eps: float, seed: int = 0) -> dict:
    from zolm.quant.primitives import compute_scales, fake_quantize
    from zolm.train.config import FinetuneConfig

    fmt = FinetuneConfig.of(out="unused", method="quzo-fm", bits=bits).base.quant_config().weight
    g = torch.Generator().manual_seed(seed)
    n = moved = 0
    dd = uu = du = 0.0
    steps = []
    for name, m in model.named_modules():
        if ".layers." not in name or not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight.detach()
        s = compute_scales(w, fmt)
        u = torch.randn(w.shape, generator=g)
        d = fake_quantize(w + eps * u, s, fmt) - fake_quantize(w, s, fmt)
        n += w.numel()
        moved += int((d != 0).sum())
        dd, uu, du = dd + float((d * d).sum()), uu + float((eps * u).pow(2).sum()), du + float((d * eps * u).sum())
        steps.append(s.flatten())
    return {"format": fmt.name, "eps": eps, "median_grid_step": float(torch.cat(steps).median()),
            "moved_share": round(moved / n, 5), "norm_ratio": round((dd / uu) ** 0.5, 3),
            "cos_d_u": round(du / (dd * uu) ** 0.5, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eps", default="1e-3", help="comma list")
    args = ap.parse_args()
    from zolm import models

    t = time.perf_counter()
    model, _ = models.load(args.model)
    rows = [grid_effect(model, bits, float(e)) for bits in (4, 8) for e in args.eps.split(",")]
    print(json.dumps({"benchmark": "quzo_fm_grid", "model": args.model, "rows": rows,
                      "wall_s": round(time.perf_counter() - t, 1), **environment()}))


if __name__ == "__main__":
    main()
