"""Logging and progress bars. Library code logs; only the CLI prints."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("zolm")


def get_logger(name: str = "zolm") -> logging.Logger:
    return logging.getLogger(name)


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, disabled when ZOLM_NO_PROGRESS is set (or ``disable=True``)."""
    disable = kwargs.pop("disable", False) or bool(os.environ.get("ZOLM_NO_PROGRESS"))
    return tqdm(iterable, file=sys.stderr, disable=disable, dynamic_ncols=True, **kwargs)
