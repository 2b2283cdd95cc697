"""Adapter-based training methods: AdaZeta (ZO on TT adapters), MeZO-LoRA (ZO on LoRA) and FO TT adapters.

They reuse ZOMethod / FOMethod (zolm/train/methods.py) and only change what trains and how it is saved:

    adazeta    ZO-SGD over the TT adapter parameters with Q_e queries per step (zolm/zo/adazeta.py;
               ``q_schedule fixed`` gives "AdaZeta with a fixed query number" = --queries)
    mezo-lora  ZO-SGD over peft LoRA A/B (r 8, alpha 16 on q_proj, v_proj; eps 1e-2: MeZO App. E)
    fo-tt      AdamW over the TT adapter parameters (backpropagation)

Adapters are initialised from a generator seeded with ``config.seed``, so rebuilding a method from the
config stored in the replay log recreates the same starting point (replay is bit-identical).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from zolm import models
from zolm.adapters import ADAPTER_PATTERN, TTAdapterConfig, add_tt_adapters, merge_adapters, save_adapters
from zolm.errors import ZolmError
from zolm.train import adapter_options
from zolm.train.config import FinetuneConfig
from zolm.train.methods import FOMethod, StepBatch, ZOMethod, save_lora_adapter
from zolm.zo.optimizer import StepRecord

log = logging.getLogger(__name__)
LORA_PATTERN = r"\.lora_[AB]\."


def tt_config(config: FinetuneConfig) -> TTAdapterConfig:
    """The TT adapter configuration of a run (shapes, placement, initialisation seed)."""
    return TTAdapterConfig(rank=config.tt_rank, bottleneck=config.tt_bottleneck, modes=config.tt_modes,
                           activation=config.tt_activation, scaling=config.tt_scaling, bias=config.tt_bias,
                           placement=list(config.tt_placement), hidden_modes=list(config.tt_hidden_modes) or None,
                           seed=config.seed)


def _training_only(config: FinetuneConfig, pattern: str) -> FinetuneConfig:
    """A copy of ``config`` whose train_params select ``pattern`` (no re-validation: the user gave none)."""
    out = copy.copy(config)
    out.train_params = [pattern]
    return out


class _TTSaving:
    """Saving for TT-adapter methods: out/adapter always; out/model merged when the adapters are linear."""

    model: torch.nn.Module
    adapter_config: TTAdapterConfig
    base_model: str

    def attach_adapters(self, model, config: FinetuneConfig) -> None:
        """Add the run's TT adapters to ``model`` (before the method selects what it trains: the adapters)."""
        self.adapter_config = tt_config(config)
        self.base_model = config.model
        self.adapted = add_tt_adapters(model, self.adapter_config)

    def save_model(self, path: Path, tokenizer) -> None:
        """A merged transformers model for identity adapters, else an adapter directory (base + adapters).

        A ReLU adapter cannot be folded into the weights, so ``path`` then holds adapter_config.json,
        adapter_model.safetensors and the tokenizer; ``zolm.adapters.load_model_with_adapters(path)`` loads it
        (plain ``from_pretrained`` refuses it: there is no config.json, rather than silently a base model).
        """
        if self.adapter_config.activation == "identity":
            try:
                models.save(merge_adapters(copy.deepcopy(self.model)), tokenizer, path)
                return
            except ZolmError as e:
                log.warning("could not merge the adapters (%s); writing an adapter directory instead", e)
        save_adapters(self.model, path, base_model=self.base_model, tokenizer=tokenizer)

    def save(self, out: Path, tokenizer) -> None:
        save_adapters(self.model, out / "adapter", base_model=self.base_model, tokenizer=tokenizer)
        self.save_model(out / "model", tokenizer)


class AdaZetaMethod(_TTSaving, ZOMethod):
    """AdaZeta (Yang et al. 2024): ZO-SGD over TT adapters, Q_e SPSA queries per step (papers.md 6.3-6.4).

    Every step averages Q_e two-point estimates on the same mini-batch, Q_e = the schedule at the loop's
    epoch; ``forwards_per_step`` follows Q_e (2 Q_e forward passes per example).
    """

    def __init__(self, model, config: FinetuneConfig, run_dir: Path | None = None):
        self.attach_adapters(model, config)
        super().__init__(model, _training_only(config, ADAPTER_PATTERN), run_dir)
        self.config = config
        self.schedule = adapter_options.schedule(config)
        self.queries = self.schedule(0)
        self.forwards_per_step = 2 * self.queries
        log.info("adazeta: %d adapters, %d trainable parameters, %s", len(self.adapted), self.params.numel(),
                 self.schedule.describe())

    def step(self, batch: StepBatch, step: int, lr: float, epoch: int = 0) -> StepRecord:
        self.queries = self.schedule(epoch)
        self.forwards_per_step = 2 * self.queries
        self.model.eval()
        return self.optimizer.step(self.loss_fn(batch), step, lr, queries=self.queries)


class MeZOLoRAMethod(ZOMethod):
    """MeZO (LoRA): ZO-SGD over peft LoRA A and B only (Malladi et al. 2023, App. E); the base is frozen."""

    def __init__(self, model, config: FinetuneConfig, run_dir: Path | None = None):
        with torch.random.fork_rng(devices=[]):  # LoRA's A init draws from the global RNG: seed it, locally
            torch.manual_seed(config.seed)
            model = FOMethod._wrap_lora(model, config)
        super().__init__(model, _training_only(config, LORA_PATTERN), run_dir)
        self.config = config

    def save_model(self, path: Path, tokenizer) -> None:
        """A plain transformers model with LoRA merged (on a copy, so the method stays usable)."""
        models.save(copy.deepcopy(self.model).merge_and_unload(), tokenizer, path)

    def save(self, out: Path, tokenizer) -> None:
        save_lora_adapter(self.model, out / "adapter", self.config.model)
        self.save_model(out / "model", tokenizer)


class FOTTMethod(_TTSaving, FOMethod):
    """First-order training (AdamW, backpropagation) of the same TT adapters, base frozen."""

    def __init__(self, model, config: FinetuneConfig, run_dir: Path | None = None):
        self.attach_adapters(model, config)
        super().__init__(model, _training_only(config, ADAPTER_PATTERN), run_dir)
        self.config = config
