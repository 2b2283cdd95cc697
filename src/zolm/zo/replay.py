"""The replay log of a ZO run (MeZO, Sec. 2.1 "storage"): its format, writer and verifying reader.

``zolm-replay-v2``, one JSON object a line:

* header: ``format``, the run's configuration (without ``out``), the optimiser's settings, a hash of the trained
  parameters' names (``params_sha256``) and a fingerprint of the base model's state before step 1
  (``base_sha256``: every tensor of the model the method trains, adapters and low-bit codes included);
* one line per step: ``step``, projected gradient(s) ``grads``, learning rate ``lr``; the seeds are a pure function
  of (run seed, step, query) (:meth:`ZOOptimizer.seeds_for`) and are stored only if they differ from it;
* ``{"event": "checkpoint", "step": s, "weights_sha256": ...}`` whenever a checkpoint is written, and a last line
  ``{"event": "end", "selected_step": s, "weights_sha256": ...}``: hashes of the trained tensors;
* every line after the header carries ``prev``, the first 8 hex digits of the SHA-256 of the line before it, so an
  edited, inserted or deleted line breaks the chain.

``zolm.train.replay`` rebuilds the weights and compares them with the recorded hashes. The chain and the hashes
detect edits and the wrong base model; they carry no secret, so they are a consistency check, not a signature.
v1 logs (seeds stored, no hashes) are still read and replayed, unverified.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from zolm.errors import ZolmError
from zolm.utils.io import atomic_write_text
from zolm.utils.outputs import write_error

FORMAT = "zolm-replay-v2"
OLD_FORMATS = ("zolm-replay-v1",)
LINK = 8  # hex digits of the chain hash


def names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def tensors_digest(named: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of tensors (sorted by name): equal iff bit-identical."""
    import torch

    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def link(line: str) -> str:
    """The chain hash of one serialised line (without its newline)."""
    return hashlib.sha256(line.encode("utf-8")).hexdigest()[:LINK]


def _dumps(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


def replay_header(config: dict, opt_header: dict, base_sha256: str | None = None) -> dict:
    """First line of a replay log: the run's configuration (without ``out``), the optimiser's settings (names
    hashed) and the base fingerprint."""
    header = dict(opt_header)
    names = header.pop("param_names")
    header.pop("decay", None)
    config = {k: v for k, v in config.items() if k != "out"}
    return {"format": FORMAT, "config": config, "num_params": len(names), "params_sha256": names_digest(names),
            "base_sha256": base_sha256, **header}


class ReplayWriter:
    """Appends chained records to a replay log; on resume keeps the lines up to a step, byte for byte."""

    def __init__(self, path: str | Path, header: dict | None = None, truncate_after: int | None = None,
                 seeds_for=None):
        """Start a log with ``header`` (``truncate_after`` None) or resume one, dropping steps > ``truncate_after``
        and the end line. ``seeds_for(step, n)`` gives the derivable seeds, which are then not stored."""
        self.path, self.seeds_for = Path(path), seeds_for
        if truncate_after is None:
            lines = [_dumps(header or {})]
        else:
            lines = []
            for raw in self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []:
                rec = json.loads(raw) if raw.strip() else {}
                if rec.get("event") != "end" and rec.get("step", -1) <= truncate_after:
                    lines.append(raw)
            if not lines:
                raise ZolmError(f"{self.path}: cannot resume a replay log without its header")
        atomic_write_text(self.path, "".join(x + "\n" for x in lines))
        self.last = lines[-1]
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(e, self.path) from None

    def _write(self, record: dict) -> None:
        line = _dumps({**record, "prev": link(self.last)})
        try:
            self._f.write(line + "\n")
            self._f.flush()
        except OSError as e:
            raise write_error(e, self.path) from None
        self.last = line

    def step(self, record: dict) -> None:
        """One step's record (``StepRecord.to_json()``); seeds dropped when ``seeds_for`` reproduces them."""
        rec = dict(record)
        if self.seeds_for is not None and rec.get("seeds") == self.seeds_for(rec["step"], len(rec["seeds"])):
            del rec["seeds"]
        self._write(rec)

    def checkpoint(self, step: int, weights_sha256: str) -> None:
        self._write({"event": "checkpoint", "step": step, "weights_sha256": weights_sha256})

    def end(self, selected_step: int, weights_sha256: str) -> None:
        self._write({"event": "end", "selected_step": selected_step, "weights_sha256": weights_sha256})

    def close(self) -> None:
        self._f.close()


def with_seeds(record: dict, seeds_for) -> dict:
    """A step record with its seeds: the stored ones, else ``seeds_for(step, queries)`` (what training used)."""
    if "seeds" in record:
        return record
    return {**record, "seeds": seeds_for(record["step"], len(record["grads"]))}


@dataclass
class ReplayLog:
    """A checked replay log: header, step records in order, recorded weight hashes by step."""

    header: dict
    records: list[dict]
    selected: int | None = None
    hashes: dict[int, str] = field(default_factory=dict)  # step -> weights_sha256 (checkpoints and the end)
    verifiable: bool = True  # False for v1 logs

    @property
    def last_step(self) -> int:
        return self.records[-1]["step"] if self.records else 0


def read_log(path: str | Path) -> ReplayLog:
    """Read and check a replay log: the chain of ``prev`` hashes, consecutive steps from 1, one end line at the
    end. Raises ZolmError naming the file and line of the first inconsistency."""
    path = Path(path)
    if not path.is_file():
        raise ZolmError(f"no such file: {path}")
    try:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except UnicodeDecodeError:
        raise ZolmError(f"{path} is not a zolm replay log (not UTF-8 text)") from None
    rows = []
    for i, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ZolmError(f"{path}:{i}: malformed JSON line ({e.msg})") from None
        if not isinstance(rows[-1], dict):
            raise ZolmError(f"{path}:{i}: expected a JSON object")
    fmt = rows[0].get("format") if rows else None
    if fmt not in (FORMAT, *OLD_FORMATS):
        raise ZolmError(f"{path} is not a zolm replay log (first line lacks format={FORMAT!r})")
    log = ReplayLog(rows[0], [], verifiable=fmt == FORMAT)
    ended = False
    for i, rec in enumerate(rows[1:], start=2):
        if log.verifiable and rec.get("prev") != link(lines[i - 2]):
            raise ZolmError(f"{path}:{i}: broken chain (this line or the one before it was edited, inserted or "
                            "deleted); refusing to replay")
        if ended:
            raise ZolmError(f"{path}:{i}: a line after the end record")
        event = rec.get("event")
        if event == "end":
            ended, log.selected = True, rec.get("selected_step")
            if rec.get("weights_sha256") and log.selected is not None:
                log.hashes[log.selected] = rec["weights_sha256"]
        elif event == "checkpoint":
            if rec.get("step") != log.last_step:
                raise ZolmError(f"{path}:{i}: checkpoint record for step {rec.get('step')} after step {log.last_step}")
            log.hashes[rec["step"]] = rec["weights_sha256"]
        elif "step" in rec:
            if rec["step"] != log.last_step + 1 or not isinstance(rec.get("grads"), list):
                raise ZolmError(f"{path}:{i}: step {rec['step']} follows step {log.last_step} (a step is missing "
                                "or out of order); refusing to replay")
            if "seeds" not in rec and not log.verifiable:
                raise ZolmError(f"{path}:{i}: step {rec['step']} lacks its seeds")
            log.records.append(rec)
    if log.selected is not None and not 0 <= log.selected <= log.last_step:
        raise ZolmError(f"{path}: the selected step {log.selected} is not in the log (1..{log.last_step})")
    return log
