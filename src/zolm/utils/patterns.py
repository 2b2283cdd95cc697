"""Regular expressions given by users (``--train-params``, ``--freeze-params``, ``mask_params``...), compiled once
with a one-line error for a bad one."""

from __future__ import annotations

import re
from collections.abc import Iterable

from zolm.errors import ZolmError


def compile_patterns(patterns: Iterable[str] | str | None, what: str = "pattern") -> list[re.Pattern]:
    """Compile every pattern; ZolmError names ``what`` (e.g. ``--train-params``), the pattern and the problem.

    A single string is refused rather than split into characters: options taking patterns take lists.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise ZolmError(f"{what} must be a list of regular expressions, got the string {patterns!r}")
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise ZolmError(f"{what}: {p!r} is not a string (a regular expression)")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ZolmError(f"{what}: {p!r} is not a valid regular expression ({e})") from None
    return out
