"""The replay log of a ZO run (MeZO, Sec. 2.1 "storage"): its format, header and reader.

The first line holds the run's whole configuration and a hash of the trained parameters' names; each further
line holds one step's seeds, projected gradients and learning rate; a last line names the selected step.
``zolm.train.replay`` rebuilds the weights from it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from zolm.errors import ZolmError
from zolm.utils.io import read_jsonl

FORMAT = "zolm-replay-v1"


def names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def replay_header(config: dict, opt_header: dict) -> dict:
    """First line of a replay log: the run's configuration and the optimiser's settings (names hashed)."""
    header = dict(opt_header)
    names = header.pop("param_names")
    header.pop("decay", None)
    return {"format": FORMAT, "config": config, "num_params": len(names), "params_sha256": names_digest(names),
            **header}


def read_log(path: str | Path) -> tuple[dict, list[dict], int | None]:
    """(header, step records, selected step or None) of a replay log."""
    rows = read_jsonl(path)
    if not rows or rows[0].get("format") != FORMAT:
        raise ZolmError(f"{path} is not a zolm replay log (first line lacks format={FORMAT!r})")
    header, records, selected = rows[0], [], None
    for r in rows[1:]:
        if r.get("event") == "end":
            selected = r.get("selected_step")
        elif "step" in r:
            records.append(r)
    return header, records, selected
