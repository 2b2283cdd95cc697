"""The run directory of ``zolm finetune``: one writer at a time, and the same command always resumes.

:func:`prepare_run_dir` decides what an existing ``--out`` means before anything is written:

* a lock file (``.zolm.lock``, the holder's pid and host) keeps a second run off a directory in use; a lock whose
  process is gone (kill -9) is stale and taken over;
* a checkpoint of the same configuration resumes from it (``out`` itself is not compared, so a relative and an
  absolute spelling of one directory are the same run); another configuration is refused;
* a directory holding only this run's files but no checkpoint (interrupted before the first one: kill -9, Ctrl-C,
  a full disk) restarts cleanly from step 0;
* what an interrupted atomic write left (``.checkpoint.old`` without ``checkpoint/``, temporary directories) is
  recovered or removed first; anything else a user has there is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

from zolm.errors import ZolmError
from zolm.train.parts import TRAIN_KINDS  # a trainable set's sub-options are keyed by its kind
from zolm.utils.io import recover_dir
from zolm.utils.outputs import check_output

LOCK = ".zolm.lock"
# What a run writes into its directory (zolm.train.loop, the methods' save(), masked methods' masks).
RUN_FILES = {"run_config.json", "metrics.jsonl", "replay.jsonl", "loss.png", "results.json", "checkpoint", "best",
             "model", "adapter", "masks.safetensors", "masks.json", LOCK}
_TEMP = re.compile(r"^\..+\.(tmp|old)$")  # atomic_write_* / atomic_dir leftovers
ATOMIC_DIRS = ("checkpoint", "best", "model", "adapter")


QUANT_FREE = ("kind", "keep_sparsity")  # what a float base uses of the base part


def comparable(config: dict) -> dict:
    """The parts of a config that make two runs the same run: all but ``out`` (spelling of the directory) and the
    options of parts the run does not use (a float base's quantization, the trainable set's other kinds), so
    that a changed default of an unused option (e.g. the MaZO curvature under MeZO) does not block a resume."""
    out = {k: v for k, v in config.items() if k != "out"}
    train, base = out.get("train"), out.get("base")
    if isinstance(train, dict):
        out["train"] = {k: v for k, v in train.items() if k not in TRAIN_KINDS or k == train.get("kind")}
    if isinstance(base, dict) and base.get("kind") == "float":
        out["base"] = {k: v for k, v in base.items() if k in QUANT_FREE}
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: ``.zolm.lock`` holding ``pid host``; stale when the pid is gone."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.held = False

    def acquire(self) -> RunLock:
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise ZolmError(f"{self.path.parent} is in use by another zolm run (pid {holder}); wait for "
                                    "it to finish or use another --out") from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # stale: its process is gone
                continue
            except OSError as e:
                raise ZolmError(f"could not write {self.path} ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise ZolmError(f"could not take the lock {self.path}")

    def _holder(self) -> int | None:
        """The pid of a live holder, or None when the lock is stale (dead pid, our own pid, unreadable)."""
        try:
            pid_s, _, host = self.path.read_text().strip().partition(" ")
            pid = int(pid_s)
        except (OSError, ValueError):
            return None
        if host and host != socket.gethostname():
            return pid  # another machine's process: cannot check, assume alive
        return pid if pid != os.getpid() and _alive(pid) else None

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False


def _clean_temps(out: Path) -> None:
    for name in ATOMIC_DIRS:
        recover_dir(out / name)
    for p in out.iterdir():
        if _TEMP.match(p.name) and p.name != LOCK:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _clear(out: Path) -> None:
    """Delete everything in ``out`` but the lock."""
    for p in out.iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _differs(saved: dict, current: dict) -> list[str]:
    from zolm.train.config import config_diff  # dotted keys of nested parts (optim.lr)

    return config_diff(comparable(saved), comparable(current))


def prepare_run_dir(out_arg: str, config: dict, overwrite: bool, inputs: list[str | None],
                    lock: RunLock | None = None) -> tuple[RunLock, dict | None]:
    """Lock ``out`` and make it ready; return ``(lock, checkpoint state to resume from or None)``.

    Args:
        out_arg: the ``--out`` value.
        config: the run's resolved configuration (``FinetuneConfig.to_dict()``).
        overwrite: start afresh, deleting what is in ``out``.
        inputs: paths the run reads (model directory, data directory): an ``out`` around them is refused.
    """
    if not out_arg:
        raise ZolmError("an output directory is required (--out)")
    out = check_output(out_arg, overwrite=True, inputs=inputs)  # inside/around inputs, writable parent
    if out.exists() and not out.is_dir():
        if not overwrite:
            raise ZolmError(f"--out {out_arg} exists and is a file; use --overwrite to replace it, or another --out")
        out.unlink()
    if out.is_dir() and not overwrite:
        names = {p.name for p in out.iterdir()}
        foreign = sorted(n for n in names if n not in RUN_FILES and not _TEMP.match(n))
        if foreign and not (out / "checkpoint" / "state.json").is_file():
            raise ZolmError(f"{out_arg} exists and is not empty; use --overwrite or another --out (it holds files "
                            f"that are not this run's, e.g. {foreign[0]})")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZolmError(f"could not create {out_arg} ({e.strerror})") from None
    lock = (lock or RunLock(out)).acquire()
    try:
        return lock, _resolve(out, out_arg, config, overwrite)
    except BaseException:
        lock.release()
        raise


def _resolve(out: Path, out_arg: str, config: dict, overwrite: bool) -> dict | None:
    if overwrite:
        _clear(out)
        return None
    if any((out / n).exists() for n in ("run_config.json", "checkpoint", ".checkpoint.old")):
        _clean_temps(out)  # only in a run directory: a user's own .tmp files elsewhere are left alone
    state = _read_json(out / "checkpoint" / "state.json")
    if state is not None:
        diff = _differs(state.get("config", {}), config)
        if diff:
            raise ZolmError(f"{out_arg} holds a run with another config (differs in: {', '.join(diff)}); "
                            "use --overwrite or another --out")
        return state
    saved = _read_json(out / "run_config.json")
    if saved is not None and _differs(saved, config):
        raise ZolmError(f"{out_arg} holds a run with another config (differs in: "
                        f"{', '.join(_differs(saved, config))}); use --overwrite or another --out")
    if any(p.name != LOCK for p in out.iterdir()) and saved is None:
        raise ZolmError(f"{out_arg} exists and is not empty; use --overwrite or another --out")
    _clear(out)  # this run, interrupted before its first checkpoint: start again from step 0
    return None
