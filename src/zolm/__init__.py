"""zolm: cheap adaptation of large language models.

Zeroth-order fine-tuning (MeZO, and the QuZO / MaZO / AdaZeta methods built on the same engine),
first-order baselines and pruning, on ordinary Hugging Face ``transformers`` models.

Importing ``zolm`` is light: submodules (and torch/transformers) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("zolm.models", "load"),
    "save": ("zolm.models", "save"),
    "FinetuneConfig": ("zolm.train.config", "FinetuneConfig"),
    "finetune": ("zolm.train.loop", "finetune"),
    "replay": ("zolm.train.replay", "replay"),
    "ZolmError": ("zolm.errors", "ZolmError"),
    "TASKS": ("zolm.data.tasks", "TASKS"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'zolm' has no attribute {name!r}")
