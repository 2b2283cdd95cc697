"""``zolm eval``: task accuracy / F1, a zero-shot suite, or text perplexity of a model or a saved result.

Perplexity follows Wanda's protocol (``zolm.eval.perplexity``): the text is tokenised once and scored in
non-overlapping windows of ``--seq-len`` tokens, by default min(2048, the model's max_position_embeddings),
i.e. 2048 for SmolLM2 (context 8192) and LLaMA; ``--max-windows`` scores only the first N windows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zolm.errors import ZolmError

DEFAULT_WINDOW = 2048


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on tasks or measure perplexity",
                       description="Prints one JSON line of metrics.")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, local directory or hub id")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--task", help="task to evaluate (accuracy, or F1 for squad)")
    p.add_argument("--tasks", help="comma-separated tasks, scored zero-shot, with their average accuracy; "
                                   "'zero-shot' = piqa,arc_easy,arc_challenge,winogrande,openbookqa,boolq,rte")
    p.add_argument("--protocol", choices=("lm-eval", "zolm"), default="lm-eval",
                   help="--tasks scoring: lm-eval = lm-evaluation-harness's prompts, acc and acc_norm (the zero-shot "
                        "suite); zolm = the training templates, mean option log-probability")
    p.add_argument("--data-dir", help="folder of <task>/<split>.jsonl files (default: the hub)")
    p.add_argument("--num-test", type=int, default=1000, help="examples per task (a seeded sample)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--perplexity", metavar="TEXT",
                   help="a raw text file (e.g. wikitext2/wiki.test.raw), or 'wikitext2' to use --data-dir's copy")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"perplexity window (default: min({DEFAULT_WINDOW}, the model's max positions))")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")


def parse_tasks(text: str | None) -> list[str]:
    """``--tasks`` value -> task names (checked against the registry); ``zero-shot`` expands to the suite."""
    from zolm.data.tasks import ZERO_SHOT, get_task

    if not text:
        return []
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        for name in (ZERO_SHOT if part == "zero-shot" else (part,)):
            get_task(name)
            if name not in names:
                names.append(name)
    if not names:
        raise ZolmError(f"--tasks {text!r} names no task")
    return names


def text_path(value: str, data_dir: str | None) -> Path:
    """The perplexity text: a file, or ``wikitext2`` = ``<data_dir>/wikitext2/wiki.test.raw``."""
    path = Path(value)
    if value == "wikitext2":
        if not data_dir:
            raise ZolmError("--perplexity wikitext2 needs --data-dir (holding wikitext2/wiki.test.raw)")
        path = Path(data_dir) / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        raise ZolmError(f"no such text file: {path}")
    return path


def run(args: argparse.Namespace) -> int:
    if not args.task and not args.tasks and not args.perplexity:
        raise ZolmError("give --task and/or --perplexity, or --tasks")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 2),
                             ("--num-test", args.num_test, 0), ("--data-seed", args.data_seed, 0),
                             ("--seq-len", args.seq_len, 2), ("--max-windows", args.max_windows, 1)):
        if value is not None and value < low:
            raise ZolmError(f"{flag} must be >= {low}, got {value}")
    from zolm.adapters import load_model_or_adapters
    from zolm.data.tasks import load_splits
    from zolm.data.zero_shot import LM_EVAL
    from zolm.eval.zero_shot import evaluate_lm_eval, sample_rows

    text = text_path(args.perplexity, args.data_dir) if args.perplexity else None
    listed = parse_tasks(args.tasks)
    lm_eval = [t for t in listed if args.protocol == "lm-eval" and t in LM_EVAL and t != args.task]
    names = ([args.task] if args.task else []) + [t for t in listed if t != args.task and t not in lm_eval]
    splits = {name: load_splits(name, args.data_dir, num_train=0, num_dev=0, num_test=args.num_test,
                                seed=args.data_seed) for name in names}  # data errors before the model loads
    rows = {name: sample_rows(name, args.data_dir, args.num_test, args.data_seed) for name in lm_eval}
    model, tok = load_model_or_adapters(args.model, args.dtype)  # also a TT adapter directory (ReLU ones too)
    result: dict = {"model": args.model}
    if splits or rows:
        from zolm.data.encode import encode_all
        from zolm.eval.evaluate import evaluate_items

        scores = {name: evaluate_items(model, tok, encode_all(tok, s.test, args.max_length), s.task.kind,
                                       args.batch_size, desc=name) for name, s in splits.items()}
        scores.update({name: evaluate_lm_eval(model, tok, name, r, args.batch_size, args.max_length)
                       for name, r in rows.items()})
        if args.task:
            result.update({"task": args.task, **scores[args.task]})
        if args.tasks:
            chosen = listed
            result["tasks"] = {name: scores[name] for name in chosen}
            accs = [scores[name]["accuracy"] for name in chosen if "accuracy" in scores[name]]
            result["average_accuracy"] = sum(accs) / len(accs) if accs else None
    if text is not None:
        import torch

        from zolm.eval.perplexity import perplexity, read_wikitext

        ids = torch.tensor(tok(read_wikitext(text))["input_ids"], dtype=torch.long)
        seq_len = args.seq_len or min(DEFAULT_WINDOW, getattr(model.config, "max_position_embeddings", DEFAULT_WINDOW))
        result.update({"text": str(text), **perplexity(model, ids, seq_len, args.max_windows)})
    print(json.dumps(result))
    return 0
