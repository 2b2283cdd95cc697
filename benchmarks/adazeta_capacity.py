"""What the TT adapters and LoRA can reach with exact gradients: first-order references for benchmarks/adazeta.py.

Where AdaZeta's validation loss levels off above MeZO-LoRA's, is it the adapters (their capacity) or the ZO
estimate? This trains the same TT adapters (``fo-tt``) and the same LoRA (``fo-lora``) by backprop + AdamW on
the same seeded split as ``benchmarks/adazeta.py --seed S`` (128 training, ``--num-val`` validation examples) and
reports the validation loss (the training objective) every ``--eval-every`` steps.

Reproduce:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/adazeta_capacity.py --seed 0 --steps 64   (~6 min)
Prints one JSON line; writes <out>/results.json.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--methods", default="fo-tt,fo-lora")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-train", type=int, default=128)
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--num-test", type=int, default=500, help="as the adazeta.py run it mirrors (fixes the split)")
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--lr-tt", type=float, default=1e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/adazeta-capacity")
    args = ap.parse_args()
    import torch.nn.functional as F

    from zolm import models
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.eval.evaluate import candidate_scores
    from zolm.train.build import build_method
    from zolm.train.config import FinetuneConfig
    from zolm.train.methods import StepBatch
    from zolm.utils.io import atomic_write_json

    t0 = time.time()
    tok = models.load_tokenizer(args.model)
    split = load_splits(args.task, DATA, args.num_train, args.num_val, args.num_test, args.seed)
    train, val = encode_all(tok, split.train, 1024), encode_all(tok, split.dev, 1024)
    gold = torch.tensor([it.gold for it in val])
    results: dict = {}
    for name in args.methods.split(","):
        lr = args.lr_tt if name == "fo-tt" else args.lr_lora
        config = FinetuneConfig.of(out="", model=args.model, task=args.task, data_dir=str(DATA), method=name, lr=lr,
                                   steps=args.steps, batch_size=args.batch, num_train=args.num_train, seed=args.seed)
        model, _ = models.load(args.model)
        method = build_method(model, config)

        def val_loss(model) -> float:
            scores = torch.tensor(candidate_scores(model, val, tok.pad_token_id, 16, "val"))
            return float(F.cross_entropy(scores, gold))

        curve = [{"step": 0, "val_loss": val_loss(method.model)}]
        gen = torch.Generator().manual_seed(args.seed)
        for step in range(1, args.steps + 1):
            idx = torch.randperm(len(train), generator=gen)[:args.batch].tolist()
            batch = training_batch([train[i] for i in idx], split.task.kind, tok.pad_token_id)
            method.step(StepBatch(parts=[(0, batch)], kinds=[split.task.kind], weights=[1.0]), step, lr)
            if step % args.eval_every == 0 or step == args.steps:
                curve.append({"step": step, "val_loss": val_loss(method.model)})
        results[name] = {"lr": lr, "trainable_params": sum(t.numel() for t in method.trainable.values()),
                         "curve": curve, "best_val_loss": min(p["val_loss"] for p in curve)}
    summary = {"benchmark": "adazeta_capacity", "task": args.task, "seed": args.seed, "steps": args.steps,
               "batch": args.batch, "num_train": args.num_train, "num_val": args.num_val, "results": results,
               "wall_s": round(time.time() - t0), **environment()}
    atomic_write_json(Path(args.out) / "results.json", summary)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
