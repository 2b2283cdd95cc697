"""Validation of FinetuneConfig's adapter and query-schedule fields (torch-free, run in __post_init__).

The fields themselves live in FinetuneConfig (one commented block); docs/adazeta.md explains them.
"""

from __future__ import annotations

import math
from typing import Any

from zolm.errors import ZolmError, unknown
from zolm.zo.adazeta import KINDS, QuerySchedule

TT_ACTIVATIONS = ("relu", "identity")
ADAPTER_METHODS = ("adazeta", "mezo-lora", "fo-tt")


def validate(cfg: Any) -> None:
    """One-line ZolmError for any bad ``tt_*`` / ``q_*`` field of a FinetuneConfig."""
    for name in ("tt_rank", "tt_bottleneck", "tt_modes", "q_max"):
        if getattr(cfg, name) < 1:
            raise ZolmError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.tt_activation not in TT_ACTIVATIONS:
        raise unknown("tt_activation", cfg.tt_activation, TT_ACTIVATIONS)
    if not math.isfinite(cfg.tt_scaling):
        raise ZolmError(f"tt_scaling must be a finite number, got {cfg.tt_scaling}")
    if cfg.tt_hidden_modes and (len(cfg.tt_hidden_modes) != cfg.tt_modes or min(cfg.tt_hidden_modes) < 2):
        raise ZolmError(f"tt_hidden_modes must be {cfg.tt_modes} (tt_modes) integers >= 2, got {cfg.tt_hidden_modes}")
    from zolm.adapters.inject import parse_placement

    for entry in cfg.tt_placement:
        parse_placement(entry, what="tt_placement entry")
    if cfg.q_schedule not in KINDS:
        raise unknown("q_schedule", cfg.q_schedule, KINDS)
    schedule(cfg)  # validates q_alpha, q_beta, q_target
    if cfg.method in ADAPTER_METHODS and cfg.train_params:
        raise ZolmError(f"--train-params does not apply to {cfg.method}: it trains only its adapters")


def schedule(cfg: Any) -> QuerySchedule:
    """The query schedule of a run; beta is fitted over total_epochs = steps / (num_train / batch_size)."""
    return QuerySchedule(kind=cfg.q_schedule, queries=cfg.queries, alpha=cfg.q_alpha, beta=cfg.q_beta,
                         q_max=cfg.q_max, q_target=cfg.q_target,
                         total_epochs=cfg.steps * cfg.batch_size / max(1, cfg.num_train))
