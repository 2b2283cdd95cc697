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
    """A tqdm bar on stderr, disabled when ZOLM_NO_PROGRESS is set or stderr is not a terminal in CI."""
    disable = bool(os.environ.get("ZOLM_NO_PROGRESS")) or kwargs.pop("disable", False)
    return tqdm(iterable, file=sys.stderr, disable=disable, dynamic_ncols=True, **kwargs)
