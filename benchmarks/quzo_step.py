"""Where a QuZO step's time goes, against a float32 MeZO step (SmolLM2-135M, one SST-2 batch).

    .venv/bin/python benchmarks/quzo_step.py [--methods mezo quzo quzo-lora] [--reps 3] [--batch 16]

Prints one JSON line: per method the mean time of one loss evaluation (forward) and of one ZO step; for ``quzo``
also the dequantization of every layer, a forward with the virtual quantized perturbation active, and the update
pass over the codes; and each step's ratio to MeZO's. All in one process (compare ratios only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA  # noqa: E402


def timeit(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["mezo", "quzo", "quzo-lora"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    from zolm import models
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.quant.linear import quantized_modules
    from zolm.train.build import build_method
    from zolm.train.config import FinetuneConfig
    from zolm.train.methods import StepBatch

    tok = models.load_tokenizer(args.model)
    split = load_splits("sst2", str(DATA), 64, 0, 0, 0)
    items = encode_all(tok, split.train[:args.batch], 1024)
    batch = StepBatch(parts=[(0, training_batch(items, split.task.kind, tok.pad_token_id))], kinds=[split.task.kind],
                      weights=[1.0])
    out: dict = {"model": args.model, "batch": args.batch, "reps": args.reps}
    for name in args.methods:
        model, _ = models.load(args.model)
        method = build_method(model, FinetuneConfig.of(out="x", model=args.model, method=name, steps=10))
        loss = method.loss_fn(batch)
        res = {"forward_s": timeit(loss, args.reps),
               "step_s": timeit(lambda m=method: m.step(batch, 1, 1e-7), args.reps)}
        if name == "quzo":
            layers = [m for _, m in quantized_modules(method.model)]
            opt = method.optimizer
            res["dequantize_all_s"] = timeit(lambda ls=layers: [m.dequantize() for m in ls], args.reps)
            opt.apply_(123, 1e-3)
            res["forward_perturbed_s"] = timeit(loss, args.reps)
            opt._seed = None
            res["update_s"] = timeit(lambda o=opt: o.update_([123], [1.0], 1e-7), args.reps)
        out[name] = {k: round(v, 3) for k, v in res.items()}
    if "mezo" in out:
        for name in args.methods:
            out[name]["step_vs_mezo"] = round(out[name]["step_s"] / out["mezo"]["step_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
