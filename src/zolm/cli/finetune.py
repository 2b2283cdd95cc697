"""``zolm finetune``: fine-tune a model with a method composed of parts (base x trainable set x estimator x
optimiser); ``--method`` names a preset, any part flag overrides it. Flags are generated from the config
dataclasses (zolm.train.config, zolm.train.parts), grouped by part, each with its help text."""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import fields

from zolm.train.config import PART_CLASSES, PARTS, FinetuneConfig, composition_table
from zolm.utils.configs import flag_name, leaves

GROUPS = {"run": "run", "data": "data (MeZO protocol)", "evaluation": "evaluation and checkpoints",
          "base": "base weights (config key base:)", "train": "trainable set (config key train:)",
          "estimator": "gradient estimator (config key estimator:)", "optim": "optimiser (config key optim:)"}


def _add(group, name: str, kind, f) -> None:
    """One flag for field ``f`` of type ``kind``, named ``--name``."""
    flags = ["--" + name.replace("_", "-")] + (["--tasks"] if name == "task" else [])
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices:
        text += f" ({' | '.join(choices)})"
    if kind is bool or kind == bool | None:
        group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        group.add_argument(*flags, dest=name, nargs="+", type=item, default=None, metavar="X", help=text)
    else:
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        group.add_argument(*flags, dest=name, type=base, default=None, help=text)


def flag_fields() -> list[tuple[str, str, object, object]]:
    """(group, flat name, type, field) of every flag, run-level options first, then each part's leaves."""
    hints = typing.get_type_hints(FinetuneConfig)
    out = [(f.metadata["group"], f.name, hints[f.name], f) for f in fields(FinetuneConfig) if f.name not in PARTS]
    for part, cls in PART_CLASSES.items():
        out += [(part, flag_name(path, f), tp, f) for path, f, tp in leaves(cls, (part,))]
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    table = "\n".join(f"  {r['method']:<20} {r['parts']}" for r in composition_table())
    p = sub.add_parser("finetune", allow_abbrev=False, help="fine-tune a model (a preset or any composition of parts)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a causal LM on a prompt-based task. A method is base weights x "
                                   "trainable set x estimator x optimiser;\n--method picks a preset and any part flag "
                                   "overrides it. Every option may also come from --config FILE\n(YAML or JSON, "
                                   "nested by part or flat); flags given here override the file.\n\npresets:\n"
                                   + table)
    p.add_argument("--config", help="YAML or JSON file with FinetuneConfig keys")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for group, name, kind, f in flag_fields():
        _add(groups[group], name, kind, f)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    given = {name: getattr(args, name) for _, name, _, _ in flag_fields() if getattr(args, name) is not None}
    if args.config:
        return FinetuneConfig.from_file(args.config, **given)
    return FinetuneConfig.from_dict(given, where="options")


def run(args: argparse.Namespace) -> int:
    from zolm.train.loop import finetune

    config = config_from_args(args)
    results = finetune(config, overwrite=args.overwrite)
    metric = "accuracy" if "accuracy" in (results["after"] or {}) else "f1"
    before = (results.get("before") or {}).get(metric)
    after = (results.get("after") or {}).get(metric)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{config.task} {metric}: before {fmt(before)}  after {fmt(after)}  "
          f"(method {config.method}: {config.describe()}, {results['steps']} steps, selected step "
          f"{results['selected_step']}, {results['train_time_s']:.0f} s training)")
    print(f"results: {config.out}/results.json  model: {config.out}/model")
    print(json.dumps({"task": config.task, "method": config.method, f"{metric}_before": before,
                      f"{metric}_after": after}))
    return 0
