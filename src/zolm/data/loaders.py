"""Read a task's rows from a local folder of JSON Lines files or from the Hugging Face hub.

Local layout (what ``../shared/data`` holds): ``<data_dir>/<task folder>/<split>.jsonl`` in the Hugging Face
schema of the dataset. Without ``data_dir`` the rows come from ``datasets.load_dataset`` (needs a hub).
"""

from __future__ import annotations

import json
from pathlib import Path

from zolm.errors import ZolmError
from zolm.utils.io import read_jsonl_numbered


def read_local(data_dir: str | Path, folder: str, split: str) -> list[tuple[int, dict]]:
    """``(file line, row)`` of ``<data_dir>/<folder>/<split>.jsonl``; errors name the missing path and what is
    there."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ZolmError(f"data directory not found: {root}")
    path = root / folder / f"{split}.jsonl"
    if not path.is_file():
        have = sorted(p.stem for p in (root / folder).glob("*.jsonl")) if (root / folder).is_dir() else []
        where = f"; {root / folder} has: {', '.join(have)}" if have else f"; no folder {root / folder}"
        raise ZolmError(f"missing data file {path}{where}")
    return read_jsonl_numbered(path)


def read_hub(path: str, name: str | None, split: str) -> list[dict]:
    """Rows of a hub dataset split (``datasets`` is imported only here)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ZolmError("loading from the hub needs the 'datasets' package") from e
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZolmError(f"could not load {path}/{name} [{split}] from the hub ({first}); "
                        "pass --data-dir with local JSON Lines files") from None
    return [dict(r) for r in ds]


def check_fields(rows: list[tuple[int, dict]], fields: tuple[str, ...], where: str, unit: str = "row") -> None:
    """Every row must carry the task's fields and an integer ``label`` if it has one (not a float, not a
    boolean); the error names ``where``, the row's ``unit`` ("line" of a file, "row" of the hub) and number."""
    for i, row in rows:
        missing = [f for f in fields if f not in row]
        if missing:
            raise ZolmError(f"{where}: {unit} {i} lacks field(s) {', '.join(missing)}; "
                            f"this task needs: {', '.join(fields)}")
        label = row.get("label")
        if "label" in row and (isinstance(label, bool) or not isinstance(label, int)):
            raise ZolmError(f"{where}: {unit} {i} has label {json.dumps(label)}; labels are integers")
