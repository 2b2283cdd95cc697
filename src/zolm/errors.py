"""The one exception type for bad user input.

Every public entry point validates what it is given and raises :class:`ZolmError` with a single line that
names the bad value and, where there is a finite set, the valid choices. The CLI prints it as
``zolm: error: <message>`` and exits with status 2; it never shows a traceback for these.
"""

from __future__ import annotations

from collections.abc import Iterable


class ZolmError(ValueError):
    """Bad input: an unknown name, a wrong path, a malformed file, a value out of range."""


def unknown(kind: str, value: object, valid: Iterable[object]) -> ZolmError:
    """Build the standard 'unknown X' error that lists the valid choices."""
    choices = ", ".join(sorted(str(v) for v in valid))
    return ZolmError(f"unknown {kind} {value!r}; valid: {choices}")
