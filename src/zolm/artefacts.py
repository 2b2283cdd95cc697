"""Folders that only zolm reads (low-bit codes, bitmap-compressed pruned weights) refuse to load elsewhere, loudly.

Such a folder's config.json is a ``save_pretrained`` config with ``model_type`` replaced by a name no other
tool knows, one that says what to do, e.g. ``zolm-int4-g32 (zolm-only folder: convert with zolm export --format
hf)``; the real type is kept under ``zolm_base_model_type``. ``AutoConfig`` / ``AutoModelForCausalLM`` (and tools
built on them: peft, vLLM, lm-eval) then raise ``ValueError: ... model type `zolm-... (convert with ...)` ...``,
and the weights file has a name transformers does not look for, so a concrete class (``LlamaForCausalLM``), which
only warns about a model-type mismatch, raises OSError instead of starting from random weights.
:func:`load_config` gives zolm the real config back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zolm.utils.io import atomic_write_json

HINT = "zolm-only folder: convert with zolm export --format hf"
BASE_KEY = "zolm_base_model_type"


def mark_config(directory: str | os.PathLike, kind: str) -> None:
    """Rewrite ``directory/config.json`` so that other tools refuse the folder with a message naming zolm."""
    path = Path(directory) / "config.json"
    d = json.loads(path.read_text(encoding="utf-8"))
    d[BASE_KEY] = d.get(BASE_KEY, d["model_type"])
    d["model_type"] = f"zolm-{kind} ({HINT})"
    atomic_write_json(path, d)


def load_config(directory: str | os.PathLike):
    """The transformers config of a folder, marked by :func:`mark_config` or not."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(directory).expanduser()
    d = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if BASE_KEY not in d:
        return AutoConfig.from_pretrained(path)
    d["model_type"] = d.pop(BASE_KEY)
    config = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    config.name_or_path = str(path)
    return config
