"""The ``estimator`` x ``optim`` parts at run time: ZO-SGD (SPSA) or backpropagation (SGD / AdamW).

:func:`zolm.train.build.build_method` composes a method from its parts; what it returns provides:
    model              the module it trains and evaluates (a peft wrapper for LoRA, ...)
    trainable          {name: tensor} saved in checkpoints (everything else is the base model's)
    torch_optimizer    a torch optimiser whose state is checkpointed, or None
    is_zo, forwards_per_step, reducer (a zolm.utils.dist.Reducer)
    step(parts, step, lr, epoch) -> StepRecord (ZO, replayable) or float loss (first order)
    save(out_dir, tokenizer)      writes out_dir/model (and whatever else the trainable set owns)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zolm.errors import ZolmError
from zolm.eval.scoring import loss_count, task_loss_sum
from zolm.train.config import FinetuneConfig
from zolm.train.sparsity import mask_gradients_, sparsity_masks
from zolm.train.trainables import Trainables
from zolm.utils.dist import Reducer, all_reduce_
from zolm.utils.patterns import compile_patterns
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


class _Saving:
    """Saving through the trainable set: out/adapter (if it has one) first, then out/model."""

    model: torch.nn.Module
    trainables: Trainables

    def save_model(self, path: Path, tokenizer) -> None:
        self.trainables.save_model(self.model, Path(path), tokenizer)

    def save(self, out: Path, tokenizer) -> None:
        if self.trainables.save_extra is not None:
            self.trainables.save_extra(self.model, Path(out), tokenizer)
        self.save_model(Path(out) / "model", tokenizer)


def combined_masks(update: dict[str, torch.Tensor], named: dict[str, torch.Tensor],
                   keep_sparsity: bool) -> dict[str, torch.Tensor]:
    """Update masks intersected with the sparsity masks of the pruned tensors among ``named`` (if kept)."""
    out = dict(update)
    if keep_sparsity:
        for name, m in sparsity_masks(named).items():
            out[name] = out[name] & m if name in out else m
    return out


class ZOMethod(_Saving):
    """ZO-SGD with the in-place seed trick over the trainable set (MeZO when used over all weights).

    Each loss evaluation sums per-task loss sums and counts over this worker's micro-batches, then across
    torchrun workers (2 scalars per task: the only traffic; weights never travel). The query count per step
    is ``estimator.queries``, or AdaZeta's adaptive schedule at the loop's epoch.
    """

    is_zo = True

    def __init__(self, trainables: Trainables, config: FinetuneConfig, schedule=None):
        self.model = model = trainables.model
        self.trainables = trainables
        self.config = config
        self.last_task_losses: list[float] = []
        for p in model.parameters():  # ZO needs no autograd graph; inference_mode is used anyway
            p.requires_grad_(False)
        self.optimizer = self.build_optimizer(trainables, config)
        self.params = self.optimizer.params
        self.torch_optimizer = None
        self.schedule = schedule
        self.queries = schedule(0) if schedule is not None else config.estimator.queries
        self.forwards_per_step = 2 * self.queries
        self.reducer = Reducer()

    @staticmethod
    def zo_config(config: FinetuneConfig) -> ZOConfig:
        e = config.estimator
        return ZOConfig(eps=e.eps, queries=e.queries, weight_decay=config.optim.weight_decay, sampler=e.sampler,
                        seed=config.seed, half_mode=e.half_mode)

    @staticmethod
    def build_optimizer(t: Trainables, config: FinetuneConfig) -> ZOOptimizer:
        """The ZO optimiser over the trained tensors: low-bit codes (QuZO), quantized or plain directions."""
        zo, e = ZOMethod.zo_config(config), config.estimator
        if t.code_layers is not None:
            from zolm.zo.quzo import QuZOOptimizer, QuZOSettings

            settings = QuZOSettings(perturb_bits=e.perturb_bits, two_draws=e.two_draws,
                                    update_rounding=e.update_rounding or "stochastic")
            return QuZOOptimizer(t.code_layers, zo, settings)
        params = ParamSet(t.model, include=t.include, exclude=t.exclude)
        masks = combined_masks(t.masks, dict(zip(params.names, params.params)), config.base.keep_sparsity)
        if masks:  # a pruned model or a mask set: perturb and update only the masked coordinates
            params = ParamSet(t.model, include=t.include, exclude=t.exclude, masks=masks)
        if e.perturb_bits:
            from zolm.zo.quantized_directions import QuantizedDirectionZO
            from zolm.zo.quzo import QuZOSettings

            return QuantizedDirectionZO(params, zo, QuZOSettings(perturb_bits=e.perturb_bits, two_draws=e.two_draws))
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
        if self.schedule is None:
            return self.optimizer.step(self.loss_fn(batch), step, lr)
        self.queries = self.schedule(epoch)
        self.forwards_per_step = 2 * self.queries
        return self.optimizer.step(self.loss_fn(batch), step, lr, queries=self.queries)


class FOMethod(_Saving):
    """First-order training by backpropagation (SGD or AdamW) of the trainable set."""

    is_zo = False
    forwards_per_step = 1

    def __init__(self, trainables: Trainables, config: FinetuneConfig):
        self.config = config
        self.trainables = trainables
        self.last_task_losses: list[float] = []
        torch.manual_seed(config.seed)
        self.model = model = trainables.model
        inc = compile_patterns(trainables.include, "--train-params")
        exc = compile_patterns(trainables.exclude, "--freeze-params")
        for name, p in model.named_parameters():
            p.requires_grad_(any(r.search(name) for r in inc) and not any(r.search(name) for r in exc))
        self.reducer = Reducer()
        named = self.trainable
        if not named:
            raise ZolmError("no trainable parameter: check --train-params / --freeze-params")
        if trainables.masks or (config.base.keep_sparsity and not trainables.lora):
            mask_gradients_(named, combined_masks(trainables.masks, named,
                                                  config.base.keep_sparsity and not trainables.lora))
        params = list(named.values())
        o = config.optim
        if o.kind == "sgd":
            self.torch_optimizer = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            self.torch_optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)

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
        if self.config.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.config.optim.max_grad_norm)
        for group in self.torch_optimizer.param_groups:
            group["lr"] = lr
        self.torch_optimizer.step()
        self.torch_optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return value
