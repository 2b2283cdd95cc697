"""The zero-shot suite's requests exactly as lm-evaluation-harness builds them (its task YAMLs, zero-shot).

Each row becomes a :class:`Request`: one (context, continuation) pair per choice, the strings lm-eval's
``doc_to_choice`` gives (whose character lengths ``acc_norm`` divides by) and the gold index. The continuation is
lm-eval's ``target_delimiter`` (" ") + the choice; texts are used as stored (no stripping). Per task
(lm_eval/tasks/<task>/*.yaml):

    arc_easy, arc_challenge  "Question: {{question}}\\nAnswer:"    choices.text            acc, acc_norm
    piqa                     "Question: {{goal}}\\nAnswer:"        [sol1, sol2]            acc, acc_norm
    openbookqa               "{{question_stem}}"                   choices.text            acc, acc_norm
    boolq                    "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"  ["no", "yes"]    acc
    rte (glue)               "{{sentence1}}\\nQuestion: {{sentence2}} True or False?\\nAnswer:"
                                                                   ["True", "False"]       acc
    winogrande               partial scoring: contexts sentence[:_] + option_i, one continuation
                             " " + sentence[_ + 1:].strip()                                 acc

(RTE rows here have the SuperGLUE names premise / hypothesis for GLUE's sentence1 / sentence2; the labels agree:
0 = entailment = "True".)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zolm.errors import ZolmError, unknown

DELIMITER = " "  # lm-eval's default target_delimiter


@dataclass(frozen=True)
class Request:
    """The loglikelihood requests of one document and what scoring them needs."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]  # lm-eval's doc_to_choice: acc_norm divides by len() of these
    gold: int
    metrics: tuple[str, ...]


def _choices(ctx: str, choices: list[str], gold: int, metrics=("acc", "acc_norm")) -> Request:
    return Request(tuple(ctx for _ in choices), tuple(DELIMITER + c for c in choices), tuple(choices), gold,
                   tuple(metrics))


def _arc(row: dict) -> Request:
    labels = list(row["choices"]["label"])
    return _choices(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]),
                    labels.index(row["answerKey"]))


def _piqa(row: dict) -> Request:
    return _choices(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _openbookqa(row: dict) -> Request:
    labels = list(row["choices"]["label"])
    return _choices(row["question_stem"], list(row["choices"]["text"]), labels.index(row["answerKey"].lstrip()))


def _boolq(row: dict) -> Request:
    return _choices(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["label"]),
                    ("acc",))


def _rte(row: dict) -> Request:
    s1, s2 = row.get("sentence1", row.get("premise")), row.get("sentence2", row.get("hypothesis"))
    return _choices(f"{s1}\nQuestion: {s2} True or False?\nAnswer:", ["True", "False"], int(row["label"]), ("acc",))


def _winogrande(row: dict) -> Request:
    sentence = row["sentence"]
    cut = sentence.index("_")
    contexts = tuple(sentence[:cut] + row[f"option{k}"] for k in (1, 2))
    target = DELIMITER + sentence[cut + 1:].strip()
    return Request(contexts, (target, target), contexts, {"1": 0, "2": 1}[str(row["answer"])], ("acc",))


LM_EVAL: dict[str, Callable[[dict], Request]] = {
    "arc_easy": _arc, "arc_challenge": _arc, "piqa": _piqa, "openbookqa": _openbookqa, "boolq": _boolq,
    "rte": _rte, "winogrande": _winogrande,
}


def request(task: str, row: dict) -> Request:
    """lm-eval's request for one row of ``task`` (one of :data:`LM_EVAL`)."""
    if task not in LM_EVAL:
        raise unknown("lm-eval zero-shot task", task, LM_EVAL)
    try:
        return LM_EVAL[task](row)
    except (KeyError, ValueError) as e:
        raise ZolmError(f"{task}: a row does not fit lm-eval's template ({type(e).__name__}: {e})") from None
