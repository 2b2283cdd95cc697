"""``zolm replay BASE LOG``: rebuild ZO-fine-tuned weights from the base model and a replay log."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="rebuild a ZO run's weights from base model + replay log",
                       description="Re-applies every logged step (no forward pass) and saves the model with "
                                   "save_pretrained; bit-identical to the trained weights on the same torch build.")
    p.add_argument("base", help="the base model (built-in name, directory or hub id)")
    p.add_argument("log", help="replay.jsonl written by zolm finetune")
    p.add_argument("--out", required=True, help="directory for the rebuilt model (never a run directory)")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (default: refuse)")
    p.add_argument("--step", type=int, default=None, help="replay up to this step (default: the selected one)")


def run(args: argparse.Namespace) -> int:
    from zolm.train.replay import replay

    method, tok, step = replay(args.log, args.base, args.step)
    method.save_model(Path(args.out), tok)
    size = Path(args.log).stat().st_size
    print(f"replayed {step} steps from {args.log} ({size / 1024:.1f} KiB) onto {args.base}; saved {args.out}")
    return 0
