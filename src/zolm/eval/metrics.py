"""Metrics: accuracy, and SQuAD's exact match and token F1 (Rajpurkar et al. 2016 normalisation)."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references)


def token_f1(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """Max over references of the harmonic mean of token precision and recall."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in references:
        gold = normalize_answer(ref).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold:
            f1 = float(pred == gold)
        elif common == 0:
            f1 = 0.0
        else:
            p, r = common / len(pred), common / len(gold)
            f1 = 2 * p * r / (p + r)
        best = max(best, f1)
    return best
