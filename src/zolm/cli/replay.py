"""``zolm replay BASE LOG``: rebuild ZO-fine-tuned weights from the base model and a replay log, verified."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="rebuild a ZO run's weights from base model + replay log",
                       description="Re-applies every logged step (no forward pass) and saves the model with "
                                   "save_pretrained; bit-identical to the trained weights on the same torch build. "
                                   "A log with a broken chain or a missing step, or a base model other than the "
                                   "run's, is refused; 'verified' means the weights match the recorded hash.")
    p.add_argument("base", help="the base model (built-in name, directory or hub id)")
    p.add_argument("log", help="replay.jsonl written by zolm finetune")
    p.add_argument("--out", required=True, help="directory for the rebuilt model (never a run directory)")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (default: refuse)")
    p.add_argument("--step", type=int, default=None, help="replay up to this step (default: the selected one)")


def run(args: argparse.Namespace) -> int:
    from zolm.train.replay import replay_verified
    from zolm.utils.outputs import check_output

    check_output(args.out, overwrite=args.overwrite, inputs=[args.base, args.log], protect_runs=True)
    r = replay_verified(args.log, args.base, args.step)
    r.method.save_model(Path(args.out), r.tokenizer)
    size = Path(args.log).stat().st_size
    check = (f"verified: the weights match the hash recorded at step {r.step}" if r.verified
             else f"not verified: the log records no weight hash for step {r.step}")
    print(f"replayed {r.step} steps from {args.log} ({size / 1024:.1f} KiB) onto {args.base}; saved {args.out}")
    print(check)
    return 0
