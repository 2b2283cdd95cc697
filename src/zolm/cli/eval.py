"""``zolm eval``: task accuracy / F1 or text perplexity of a model or a saved result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zolm.errors import ZolmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a task or measure perplexity",
                       description="Prints one JSON line of metrics.")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, local directory or hub id")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--task", help="task to evaluate (accuracy, or F1 for squad)")
    p.add_argument("--data-dir", help="folder of <task>/<split>.jsonl files (default: the hub)")
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--perplexity", metavar="TEXT",
                   help="a raw text file (e.g. wikitext2/wiki.test.raw), or 'wikitext2' to use --data-dir's copy")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: min(2048, model max))")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")


def run(args: argparse.Namespace) -> int:
    if not args.task and not args.perplexity:
        raise ZolmError("give --task and/or --perplexity")
    from zolm import models

    text_path = None
    if args.perplexity:
        text_path = Path(args.perplexity)
        if args.perplexity == "wikitext2":
            if not args.data_dir:
                raise ZolmError("--perplexity wikitext2 needs --data-dir (holding wikitext2/wiki.test.raw)")
            text_path = Path(args.data_dir) / "wikitext2" / "wiki.test.raw"
        if not text_path.is_file():
            raise ZolmError(f"no such text file: {text_path}")
    splits = None
    if args.task:
        from zolm.data.tasks import load_splits

        splits = load_splits(args.task, args.data_dir, num_train=0, num_dev=0, num_test=args.num_test,
                             seed=args.data_seed)
    model, tok = models.load(args.model, args.dtype)
    result: dict = {"model": args.model}
    if splits is not None:
        from zolm.data.encode import encode_all
        from zolm.eval.evaluate import evaluate_items

        items = encode_all(tok, splits.test, args.max_length)
        result.update({"task": args.task, **evaluate_items(model, tok, items, splits.task.kind, args.batch_size)})
    if text_path is not None:
        import torch

        from zolm.eval.perplexity import perplexity, read_wikitext

        ids = torch.tensor(tok(read_wikitext(text_path))["input_ids"], dtype=torch.long)
        seq_len = args.seq_len or min(2048, getattr(model.config, "max_position_embeddings", 2048))
        result.update({"text": str(text_path), **perplexity(model, ids, seq_len, args.max_windows)})
    print(json.dumps(result))
    return 0
