"""Training methods behind one interface: ZO (MeZO) and first-order baselines (AdamW, SGD, LoRA).

A method is built as ``Method(model, config, kind)`` and provides:
    model              the module it trains and evaluates (a peft wrapper for LoRA, ...)
    trainable          {name: tensor} saved in checkpoints (everything else is the base model's)
    torch_optimizer    a torch optimiser whose state is checkpointed, or None
    is_zo, forwards_per_step, reducer (a zolm.utils.dist.Reducer)
    step(parts, step, lr, epoch) -> StepRecord (ZO, replayable) or float loss (first order)
    save(out_dir, tokenizer)      writes out_dir/model (and whatever else the method owns)
The registry ``METHODS`` maps ``--method`` names to these classes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zolm import models
from zolm.errors import ZolmError
from zolm.eval.scoring import loss_count, task_loss_sum
from zolm.train.config import FinetuneConfig
from zolm.train.sparsity import mask_gradients_, mask_lora_, merge_masked_lora, sparsity_masks
from zolm.utils.dist import Reducer, all_reduce_
from zolm.zo.optimizer import DivergenceError, StepRecord, ZOConfig, ZOOptimizer
from zolm.zo.rng import derive_seed
from zolm.zo.spsa import ParamSet


@dataclass
class StepBatch:
    """One training step's data on this worker.

    ``parts`` are (task index, micro-batch) pairs; ``weights[t]`` is task t's share of the global batch.
    The step's loss is ``sum_t weights[t] * L_t`` where ``L_t`` is task t's loss over the whole global batch
    (its loss sums and counts added up over micro-batches and workers), i.e. for one task exactly the loss
    of one big batch, however it is split.
    """

    parts: list[tuple[int, dict]]
    kinds: list[str]
    weights: list[float]

    def local_counts(self) -> list[int]:
        counts = [0] * len(self.kinds)
        for t, b in self.parts:
            counts[t] += loss_count(b, self.kinds[t])
        return counts


def combine(batch: StepBatch, sums: list[float], counts: list[float]) -> tuple[float, list[float]]:
    """(weighted loss, per-task losses) from global per-task loss sums and counts."""
    per_task = [s / c if c else float("nan") for s, c in zip(sums, counts)]
    return sum(w * x for w, x, c in zip(batch.weights, per_task, counts) if c), per_task


class ZOMethod:
    """MeZO: ZO-SGD with the in-place seed trick over the selected parameters.

    Each loss evaluation sums per-task loss sums and counts over this worker's micro-batches, then across
    torchrun workers (2 scalars per task: the only traffic; weights never travel).
    """

    is_zo = True

    def __init__(self, model, config: FinetuneConfig, run_dir: Path | None = None):
        self.model = model
        self.last_task_losses: list[float] = []
        for p in model.parameters():  # ZO needs no autograd graph; inference_mode is used anyway
            p.requires_grad_(False)
        self.optimizer = self.build_optimizer(model, config, self.zo_config(config))
        self.params = self.optimizer.params
        self.torch_optimizer = None
        self.forwards_per_step = 2 * config.queries
        self.reducer = Reducer()

    @staticmethod
    def zo_config(config: FinetuneConfig) -> ZOConfig:
        return ZOConfig(eps=config.eps, queries=config.queries, weight_decay=config.weight_decay,
                        sampler=config.sampler, seed=config.seed, half_mode=config.half_mode)

    def build_optimizer(self, model, config: FinetuneConfig, zo: ZOConfig) -> ZOOptimizer:
        """The ZO optimiser over this method's parameter space (override for other spaces)."""
        params = ParamSet(model, include=config.train_params or [".*"], exclude=config.freeze_params)
        if config.keep_sparsity:  # a pruned model: perturb and update only its non-zero weights
            masks = sparsity_masks(dict(zip(params.names, params.params)))
            if masks:
                params = ParamSet(model, include=config.train_params or [".*"], exclude=config.freeze_params,
                                  masks=masks)
        return ZOOptimizer(params, zo)

    @property
    def trainable(self) -> dict[str, torch.Tensor]:
        """Trained tensors and the optimiser's float32 masters (half_mode exact): what a checkpoint holds."""
        return {**dict(zip(self.params.names, self.params.params)), **self.optimizer.extra_state()}

    def loss_fn(self, batch: StepBatch) -> Callable[[], float]:
        n = len(batch.kinds)
        seen: list[list[float]] = []

        def fn() -> float:
            sums = [0.0] * n
            with torch.inference_mode():
                for t, mb in batch.parts:
                    sums[t] += float(task_loss_sum(self.model, mb, batch.kinds[t]))
            reduced = self.reducer.sum(sums + batch.local_counts())
            loss, per_task = combine(batch, reduced[:n], reduced[n:])
            seen.append(per_task)
            self.last_task_losses = [sum(v) / len(seen) for v in zip(*seen)]  # mean over this step's calls
            return loss
        return fn

    def step(self, batch: StepBatch, step: int, lr: float, epoch: int = 0) -> StepRecord:
        self.model.eval()
        return self.optimizer.step(self.loss_fn(batch), step, lr)

    def save_model(self, path: Path, tokenizer) -> None:
        models.save(self.model, tokenizer, path)

    def save(self, out: Path, tokenizer) -> None:
        self.save_model(out / "model", tokenizer)


class FOMethod:
    """First-order fine-tuning by backpropagation: full (AdamW or SGD) or LoRA (via peft, AdamW)."""

    is_zo = False
    forwards_per_step = 1

    def __init__(self, model, config: FinetuneConfig, run_dir: Path | None = None):
        self.config = config
        self.last_task_losses: list[float] = []
        torch.manual_seed(config.seed)  # LoRA initialisation
        if config.method == "fo-lora":
            model = self._wrap_lora(model, config)
            if config.keep_sparsity:
                mask_lora_(model)
        else:
            inc = [re.compile(p) for p in config.train_params] or [re.compile(".*")]
            exc = [re.compile(p) for p in config.freeze_params]
            for name, p in model.named_parameters():
                p.requires_grad_(any(r.search(name) for r in inc) and not any(r.search(name) for r in exc))
        self.model = model
        self.reducer = Reducer()
        named = self.trainable
        if not named:
            raise ZolmError("no trainable parameter: check --train-params / --freeze-params")
        if config.keep_sparsity and config.method != "fo-lora":
            mask_gradients_(named, sparsity_masks(named))
        params = list(named.values())
        if config.method == "fo-sgd":
            self.torch_optimizer = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.torch_optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    @staticmethod
    def _wrap_lora(model, config: FinetuneConfig):
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in config.lora_targets if t not in names]
        if missing:
            raise ZolmError(f"LoRA target module(s) {', '.join(missing)} not in the model; "
                            f"e.g.: {', '.join(sorted(n for n in names if 'proj' in n or 'fc' in n)[:12])}")
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    @property
    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def step(self, batch: StepBatch, step: int, lr: float, epoch: int = 0) -> float:
        """Backward of sum_t w_t * (loss sum of t / global count of t) over this worker's micro-batches."""
        self.model.train()
        torch.manual_seed(derive_seed(self.config.seed, step))  # dropout, if the model has any
        n = len(batch.kinds)
        counts = self.reducer.sum(batch.local_counts())
        sums = [0.0] * n
        for t, mb in batch.parts:
            loss_sum = task_loss_sum(self.model, mb, batch.kinds[t])
            sums[t] += float(loss_sum.detach())
            (batch.weights[t] * loss_sum / max(counts[t], 1)).backward()
        value, self.last_task_losses = combine(batch, self.reducer.sum(sums), counts)
        if not math.isfinite(value):
            self.torch_optimizer.zero_grad(set_to_none=True)
            raise DivergenceError(f"loss is not finite at step {step} ({value})")
        grads = [p.grad for p in self.trainable.values() if p.grad is not None]
        self.reducer.bytes_sent += all_reduce_(grads)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.config.max_grad_norm)
        for group in self.torch_optimizer.param_groups:
            group["lr"] = lr
        self.torch_optimizer.step()
        self.torch_optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return value

    def save_model(self, path: Path, tokenizer) -> None:
        """A plain transformers model (LoRA merged into the base weights)."""
        model = merge_masked_lora(self.model) if self.config.method == "fo-lora" else self.model
        models.save(model, tokenizer, path)

    def save(self, out: Path, tokenizer) -> None:
        """out/model, and out/adapter for LoRA (written first: merging unloads the adapter)."""
        if self.config.method == "fo-lora":
            save_lora_adapter(self.model, out / "adapter", self.config.model)
        self.save_model(out / "model", tokenizer)


def save_lora_adapter(model, path: Path, base_model: str) -> None:
    """peft's save_pretrained, recording ``base_model`` (the id or path the user gave, e.g. ``smollm2-135m``) as
    ``base_model_name_or_path`` in adapter_config.json rather than wherever the weights were read from."""
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_model
    model.save_pretrained(path)


METHODS: dict[str, type] = {"mezo": ZOMethod, "fo-adamw": FOMethod, "fo-sgd": FOMethod, "fo-lora": FOMethod}


def _registry() -> dict[str, type]:
    """Every method, including those defined in their own modules (imported here, explicitly)."""
    from zolm.train.adapter_methods import AdaZetaMethod, FOTTMethod, MeZOLoRAMethod
    from zolm.train.mask_methods import MaskedZOMethod
    from zolm.train.quant_methods import FOSTEMethod, QuZOMethod

    return {**METHODS, "quzo": QuZOMethod, "quant-mezo": QuZOMethod, "fo-ste": FOSTEMethod,
            "adazeta": AdaZetaMethod,  # ZO on TT adapters, adaptive queries (docs/adazeta.md)
            "mezo-lora": MeZOLoRAMethod,  # ZO on peft LoRA A/B
            "fo-tt": FOTTMethod,  # first-order (AdamW) TT adapters
            **dict.fromkeys(("mazo", "mezo-random-mask", "mezo-magnitude-mask"), MaskedZOMethod)}  # docs/mazo.md


def build_method(model, config: FinetuneConfig, run_dir: Path | None = None):
    """The method ``config.method`` around ``model``; ``run_dir`` holds method artefacts (e.g. masks)."""
    return _registry()[config.method](model, config, run_dir)
