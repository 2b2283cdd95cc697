"""Atomic writes and JSON Lines reading/writing.

Every file zolm writes goes through a temporary file in the same directory followed by ``os.replace``,
so an interrupted run never leaves a half-written file behind. Directories (model checkpoints) are
written the same way with :func:`atomic_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zolm.errors import ZolmError
from zolm.utils.outputs import is_write_error, write_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_write_error(e):
            raise write_error(e, path) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block exits without error.

    The previous contents of ``path`` stay in place until the new directory is complete; they are moved
    aside, the new directory is renamed into place, then the old one is deleted.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise write_error(e, path) from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            raise write_error(e, path) from None
        raise
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)  # a kill between the two renames leaves old + tmp: recover_dir puts old back
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)


def recover_dir(path: str | os.PathLike) -> None:
    """Undo what an interrupted :func:`atomic_dir` left next to ``path``.

    A kill between its two renames leaves ``.<name>.old`` (the previous, complete directory) and no ``path``:
    the old one is put back. Temporary ``.<name>.*.tmp`` directories (complete or not) are deleted, as is an
    ``.old`` left behind once ``path`` is in place.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


def read_jsonl_numbered(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, row)`` of every non-blank line of a JSON Lines file.

    A line that is not UTF-8, not JSON or not a JSON object raises ZolmError naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise ZolmError(f"no such file: {path}")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ZolmError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ZolmError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise ZolmError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON Lines file; a malformed line raises ZolmError naming the file and line number."""
    return [row for _, row in read_jsonl_numbered(path)]


class JsonlWriter:
    """Append-only JSON Lines log, flushed after every record so a crash loses at most one line."""

    def __init__(self, path: str | os.PathLike, *, truncate_after: int | None = None, key: str = "step"):
        """Open ``path`` for appending.

        Args:
            truncate_after: when resuming, drop existing records whose ``key`` is greater than this value
                (they belong to steps that will be redone), so the log of a resumed run equals the log of
                an uninterrupted one. ``None`` starts a fresh file.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get(key, -1) <= truncate_after]
            atomic_write_text(self.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(e, self.path) from None

    def write(self, record: dict) -> None:
        self.write_line(json.dumps(record, separators=(",", ":")))

    def write_line(self, line: str) -> None:
        """Append one already serialised record (no newline) and flush it."""
        try:
            self._f.write(line + "\n")
            self._f.flush()
        except OSError as e:
            raise write_error(e, self.path) from None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
