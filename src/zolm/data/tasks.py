"""The task registry and MeZO's data sampling (Malladi et al. 2023, App. E; papers.md section 3.1).

Sampling, as MeZO does for causal LMs: one seeded permutation of the train split gives ``num_train +
num_dev`` examples, the last ``num_dev`` of them being the dev set; the test set is the first ``num_test``
examples of a seeded permutation of the validation split (SuperGLUE test labels are hidden). Defaults:
1000 / 500 / 1000, CB and COPA 100 dev.

Zero-shot multiple-choice tasks (``ZERO_SHOT``: PIQA, ARC-Easy, ARC-Challenge, WinoGrande, OpenBookQA, plus
BoolQ and RTE) are scored on their evaluation split: ``validation`` for PIQA and WinoGrande (test labels are
hidden), ``test`` for ARC and OpenBookQA, as lm-eval-harness does.

When a task has no train split at hand (the local BoolQ and SQuAD copies hold only validation), train and
dev are carved from the validation split instead: test takes the first ``min(num_test, half)`` of its
permutation and train/dev come from the rest, so the three sets never overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zolm.data import templates
from zolm.data.loaders import check_fields, read_hub, read_local
from zolm.data.templates import Example
from zolm.errors import ZolmError, unknown


@dataclass(frozen=True)
class TaskSpec:
    """What zolm needs to know about a task."""

    name: str
    kind: str  # "classification" (CE over candidates), "multiple_choice" or "generation" (teacher forcing)
    fields: tuple[str, ...]  # fields a row must carry (after flattening)
    render: Callable[[dict], Example]
    hub: tuple[str, str | None]  # datasets.load_dataset(path, name)
    folder: str  # folder under --data-dir
    train_split: str | None = "train"
    test_split: str = "validation"
    num_dev: int = 500
    flatten: Callable[[dict], Iterable[dict]] | None = None
    metric: str = "accuracy"


def _flatten_multirc(row: dict) -> Iterable[dict]:
    """SuperGLUE's nested MultiRC (one line per passage) -> HF rows, one per (question, answer option)."""
    if not isinstance(row.get("passage"), dict):
        yield row  # already flat (HF hub layout)
        return
    passage = row["passage"]
    for q in passage.get("questions", []):
        for a in q.get("answers", []):
            yield {"paragraph": passage["text"], "question": q["question"], "answer": a["text"],
                   "label": a["label"], "idx": {"paragraph": row.get("idx"), "question": q.get("idx"),
                                                "answer": a.get("idx")}}


def _spec(name, kind, fields, hub, **kw) -> TaskSpec:
    return TaskSpec(name=name, kind=kind, fields=tuple(fields), render=getattr(templates, name), hub=hub,
                    folder=kw.pop("folder", name), **kw)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _spec("sst2", "classification", ["sentence", "label"], ("glue", "sst2")),
    _spec("rte", "classification", ["premise", "hypothesis", "label"], ("super_glue", "rte")),
    _spec("cb", "classification", ["premise", "hypothesis", "label"], ("super_glue", "cb"), num_dev=100),
    _spec("boolq", "classification", ["passage", "question", "label"], ("super_glue", "boolq")),
    _spec("wsc", "classification", ["text", "span1_text", "span2_text", "label"], ("super_glue", "wsc.fixed")),
    _spec("wic", "classification", ["word", "sentence1", "sentence2", "label"], ("super_glue", "wic")),
    _spec("multirc", "classification", ["paragraph", "question", "answer", "label"], ("super_glue", "multirc"),
          flatten=_flatten_multirc),
    _spec("copa", "multiple_choice", ["premise", "choice1", "choice2", "question", "label"],
          ("super_glue", "copa"), num_dev=100),
    _spec("squad", "generation", ["title", "context", "question", "answers"], ("squad", None), metric="f1"),
    # zero-shot suite of the pruning papers (templates.py: "Question: ...\nAnswer:" + " <choice>")
    _spec("piqa", "multiple_choice", ["goal", "sol1", "sol2", "label"], ("piqa", None)),
    _spec("arc_easy", "multiple_choice", ["question", "choices", "answerKey"], ("ai2_arc", "ARC-Easy"),
          test_split="test"),
    _spec("arc_challenge", "multiple_choice", ["question", "choices", "answerKey"], ("ai2_arc", "ARC-Challenge"),
          test_split="test"),
    _spec("winogrande", "multiple_choice", ["sentence", "option1", "option2", "answer"],
          ("winogrande", "winogrande_xl")),
    _spec("openbookqa", "multiple_choice", ["question_stem", "choices", "answerKey"], ("openbookqa", "main"),
          test_split="test"),
]}

# The zero-shot suite Wanda and Wanda++ report (HellaSwag is not in the local data; see docs/pruning.md).
ZERO_SHOT = ("piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "boolq", "rte")


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise unknown("task", name, TASKS)
    return TASKS[name]


def load_rows(task: TaskSpec, split: str, data_dir: str | Path | None) -> list[dict]:
    """The task's rows of one split, flattened; every row is checked (fields, label type, the template and the
    label's range) here, before any sampling, and an error names the file and line (hub: the row)."""
    if data_dir is not None:
        rows = read_local(data_dir, task.folder, split)
        where, unit = str(Path(data_dir) / task.folder / f"{split}.jsonl"), "line"
    else:
        rows = list(enumerate(read_hub(task.hub[0], task.hub[1], split), start=1))
        where, unit = f"{task.hub[0]}/{task.hub[1]} [{split}]", "row"
    if task.flatten is not None:
        rows = [(i, r) for i, row in rows for r in task.flatten(row)]
    check_fields(rows, task.fields, where, unit)
    for i, row in rows:
        _render(task, row, f": {where}: {unit} {i}")
    return [r for _, r in rows]


def _render(task: TaskSpec, row: dict, where: str) -> Example:
    try:
        ex = task.render(row)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise ZolmError(f"{task.name}{where} does not fit the template ({type(e).__name__}: {e})") from None
    if task.kind != "generation" and not 0 <= ex.gold < len(ex.candidates):
        raise ZolmError(f"{task.name}{where} has label {ex.gold}, valid: 0..{len(ex.candidates) - 1}")
    return ex


def render_rows(task: TaskSpec, rows: list[dict], where: str = "") -> list[Example]:
    """Examples of rows (checked already by :func:`load_rows`; ``where`` names them if one still fails)."""
    return [_render(task, row, f"{where}: row {i}") for i, row in enumerate(rows, start=1)]


@dataclass
class Splits:
    """Rendered train / dev / test examples of one task."""

    task: TaskSpec
    train: list[Example] = field(default_factory=list)
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)


def load_splits(task: str | TaskSpec, data_dir: str | Path | None = None, num_train: int = 1000,
                num_dev: int | None = None, num_test: int = 1000, seed: int = 0) -> Splits:
    """Sample train / dev / test as MeZO does (see module docstring)."""
    spec = get_task(task) if isinstance(task, str) else task
    num_dev = spec.num_dev if num_dev is None else num_dev
    for n, what in ((num_train, "num_train"), (num_dev, "num_dev"), (num_test, "num_test"), (seed, "data_seed")):
        if n < 0:
            raise ZolmError(f"{what} must be >= 0, got {n}")
    test_rows = load_rows(spec, spec.test_split, data_dir)
    perm = np.random.default_rng(seed).permutation(len(test_rows))
    train_rows: list[dict]
    if spec.train_split is not None and _has_split(spec, spec.train_split, data_dir):
        train_rows = load_rows(spec, spec.train_split, data_dir)
        test = [test_rows[i] for i in perm[:num_test]]
    else:  # no train split: carve train/dev from validation, unless none is wanted (zero-shot evaluation)
        n_test = min(num_test, len(test_rows) // 2) if num_train + num_dev else num_test
        test = [test_rows[i] for i in perm[:n_test]]
        train_rows = [test_rows[i] for i in perm[n_test:]]
    tperm = np.random.default_rng(seed).permutation(len(train_rows))[:num_train + num_dev]
    picked = [train_rows[i] for i in tperm]
    n_dev = min(num_dev, len(picked) // 2) if num_train else min(num_dev, len(picked))
    train, dev = picked[:len(picked) - n_dev], picked[len(picked) - n_dev:]
    return Splits(spec, render_rows(spec, train, " [train]"), render_rows(spec, dev, " [dev]"),
                  render_rows(spec, test, " [test]"))


def _has_split(spec: TaskSpec, split: str, data_dir: str | Path | None) -> bool:
    if data_dir is None:
        return True
    return (Path(data_dir).expanduser() / spec.folder / f"{split}.jsonl").is_file()
