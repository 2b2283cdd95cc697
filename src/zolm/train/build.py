"""Compose a method from its parts: base weights -> trainable set -> estimator x optimiser.

    base       zolm.train.base_weights   float as loaded, zolm low-bit codes, or fake-quantized float masters
    train      zolm.train.trainables     all / LoRA / TT adapters / a mask (+ how the result is saved)
    estimator  zolm.train.methods        ZOMethod (SPSA: plain, quantized directions, or on low-bit codes; fixed
    optim                                or adaptive queries) or FOMethod (backprop, SGD / AdamW)

Every preset (``--method``) and every valid combination of part options goes through this one function.
"""

from __future__ import annotations

from pathlib import Path

from zolm.train.adapter_sets import lora_set, tt_set
from zolm.train.base_weights import prepare_base_
from zolm.train.config import FinetuneConfig
from zolm.train.mask_set import mask_set
from zolm.train.methods import FOMethod, ZOMethod
from zolm.train.trainables import Trainables, all_set
from zolm.zo.adazeta import QuerySchedule

TRAINABLE_SETS = {"all": lambda model, config, run_dir: all_set(model, config),  # the train part's kinds
                  "lora": lambda model, config, run_dir: lora_set(model, config),
                  "tt": lambda model, config, run_dir: tt_set(model, config),
                  "mask": mask_set}


def select(model, config: FinetuneConfig, run_dir: Path | None = None) -> Trainables:
    """The trainable set ``config.train`` over ``model`` (whose base part is prepared)."""
    return TRAINABLE_SETS[config.train.kind](model, config, run_dir)


def query_schedule(config: FinetuneConfig) -> QuerySchedule:
    """The query schedule of a run; beta is fitted over total_epochs = steps / (num_train / batch_size)."""
    e = config.estimator
    return QuerySchedule(kind=e.schedule, queries=e.queries, alpha=e.q_alpha, beta=e.q_beta, q_max=e.q_max,
                         q_target=e.q_target, total_epochs=config.steps * config.batch_size / max(1, config.num_train))


def build_method(model, config: FinetuneConfig, run_dir: Path | None = None):
    """The method ``config`` composes around ``model`` (changed in place); ``run_dir`` holds its artefacts."""
    prepare_base_(model, config)
    trainables = select(model, config, run_dir)
    if not config.is_zo:
        return FOMethod(trainables, config)
    schedule = query_schedule(config) if config.estimator.schedule == "adaptive" else None
    return ZOMethod(trainables, config, schedule)
