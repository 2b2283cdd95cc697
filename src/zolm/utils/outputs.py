"""Guards for output paths: nothing a user already has is deleted unless they pass ``--overwrite``.

Every subcommand that writes (``quantize``, ``prune``, ``export``, ``replay``, ``finetune``, ``run``) calls
:func:`check_output` before any heavy work: an existing non-empty directory or an existing file at ``--out`` is
refused in one line, so is an output inside one of the command's inputs (or an input inside the output, which
``--overwrite`` would delete), and an output whose parent cannot be written. :func:`write_error` turns the
``OSError`` of a failed write (read-only directory, full disk) into one line naming what could not be written where.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from zolm.errors import ZolmError

# Files that mark a directory as a zolm run directory: never replaced by another command's output.
RUN_MARKERS = ("run_config.json", "replay.jsonl", "pipeline.json")


def _norm(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: str | os.PathLike, *, overwrite: bool = False, kind: str = "directory",
                 inputs: Iterable[str | os.PathLike | None] = (), protect_runs: bool = False) -> Path:
    """Check that ``out`` may be written; return it as an absolute path. Nothing is created or deleted.

    Args:
        out: the output path (a directory, or a file when ``kind`` is ``"file"``).
        overwrite: the user allowed replacing what is at ``out``.
        kind: ``"directory"`` or ``"file"``.
        inputs: paths the command reads (models, logs, data); only existing local paths are compared, so hub ids
            and built-in names pass through.
        protect_runs: refuse a zolm run directory at ``out`` even with ``overwrite`` (``zolm replay --out``).

    Raises:
        ZolmError: ``out`` holds something and ``overwrite`` is off, ``out`` is inside an input or an input is
            inside ``out``, or the nearest existing parent is not a writable directory.
    """
    if not os.fspath(out):
        raise ZolmError("an output path is required (--out)")
    path = _norm(out)
    for given in inputs:
        if given is None or not os.fspath(given) or not os.path.exists(os.path.expanduser(os.fspath(given))):
            continue
        src = _norm(given).resolve()
        dst = path.resolve() if path.exists() else path.parent.resolve() / path.name
        if _inside(dst, src) or _inside(src, dst):
            rel = "inside its input" if _inside(dst, src) else "around its input"
            raise ZolmError(f"--out {out} is {rel} {given}; choose an output outside the inputs")
    if path.exists() or path.is_symlink():
        if protect_runs and path.is_dir() and any((path / m).exists() for m in RUN_MARKERS):
            raise ZolmError(f"--out {out} is a zolm run directory; it is never replaced: choose another --out")
        if path.is_dir() and kind == "file":
            raise ZolmError(f"--out {out} is a directory; give a file path")
        if path.is_dir() and not any(path.iterdir()):
            pass  # an empty directory holds nothing to lose
        elif not overwrite:
            what = "a non-empty directory" if path.is_dir() else "a file"
            raise ZolmError(f"--out {out} exists ({what}); use --overwrite to replace it, or another --out")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ZolmError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZolmError(f"cannot write {out}: {parent} is not writable")
    return path


def write_error(err: BaseException, path: str | os.PathLike) -> ZolmError:
    """One line for a failed write of ``path``: which file (if known), where, and why (e.g. no space left)."""
    if isinstance(err, OSError):
        name = err.filename or path
        why = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            why = "no space left on the device"
    else:  # safetensors raises its own error type for I/O failures
        name, why = path, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ZolmError(f"could not write {name} ({why})")


def is_write_error(err: BaseException) -> bool:
    """True for the errors a failed write raises: ``OSError`` and safetensors' own I/O error."""
    return isinstance(err, OSError) or type(err).__name__ == "SafetensorError"
