"""Build a multi-task update mask for a model: which weights are maskable, and the three kinds of mask.

``importance`` (MaZO): for each task, first-order probes on its calibration examples
(:func:`zolm.masks.calibrate.gradient_stats`) -> S_hat^t (:mod:`zolm.masks.importance`) -> summed over tasks
-> top-k per row (:mod:`zolm.masks.multitask`). Tasks are processed one at a time, so memory holds one task's
statistics (2 floats per maskable weight) plus the running sum (1 float), never all tasks at once.
``random`` and ``magnitude`` need no data.

Maskable weights (papers.md 5.4): by default the weights of the linear (or GPT-2 Conv1D, stored ``[in, out]``)
layers inside the decoder blocks that :mod:`zolm.blocks` finds, for any architecture (``MASKABLE``); embeddings,
norms, biases and the LM head stay frozen. Masks follow the stored layout: a Conv1D's rows are its input
features. A fisher curvature on a calibration set that fits one mini-batch splits it in two (logged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from zolm.blocks import block_linear_names
from zolm.data.encode import Encoded, training_batch
from zolm.errors import ZolmError
from zolm.eval.scoring import task_loss
from zolm.masks.calibrate import gradient_stats
from zolm.masks.importance import ImportanceConfig, normalized_task_score, score_terms
from zolm.masks.multitask import check_kind, check_ratio, magnitude_mask, overlap_stats, random_mask, topk_row_mask
from zolm.utils.patterns import compile_patterns
from zolm.zo.rng import derive_seed, pack_mask

log = logging.getLogger(__name__)

BLOCK_LINEARS = "<decoder block linears>"  # stands for the weights of every linear / Conv1D layer of the blocks
MASKABLE = (BLOCK_LINEARS,)


@dataclass
class MaskRecipe:
    """Everything a mask is a function of (besides the model and the calibration data); saved with the mask."""

    kind: str = "importance"
    ratio: float = 0.05
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    calib_examples: int = 64
    calib_batch_size: int = 8
    seed: int = 0  # random masks

    def __post_init__(self) -> None:
        check_kind(self.kind)
        check_ratio(self.ratio)
        if isinstance(self.importance, dict):
            self.importance = ImportanceConfig(**self.importance)
        for name in ("calib_examples", "calib_batch_size"):
            if getattr(self, name) < 1:
                raise ZolmError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskData:
    """One task's calibration examples (already tokenised) and its loss kind."""

    name: str
    kind: str
    examples: list[Encoded]


def maskable_weights(model: nn.Module, patterns: Sequence[str] = MASKABLE, include: Sequence[str] = (),
                     exclude: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of the 2-D weights matching one of ``patterns`` (and ``include`` if given), not
    ``exclude``; in ``named_parameters`` order. Raises ZolmError when nothing matches."""
    exact = set()
    if BLOCK_LINEARS in patterns:
        exact = {f"{n}.weight" for n in block_linear_names(model)}
        patterns = [p for p in patterns if p != BLOCK_LINEARS]
    pats = compile_patterns(patterns, "mask_params")
    inc = compile_patterns(include, "train_params")
    exc = compile_patterns(exclude, "freeze_params")
    out = {}
    for name, p in model.named_parameters():
        if not (name in exact or any(r.search(name) for r in pats)) or (inc and not any(r.search(name) for r in inc)):
            continue
        if any(r.search(name) for r in exc):
            continue
        if p.dim() != 2:
            raise ZolmError(f"maskable parameter {name} has shape {tuple(p.shape)}; masks need [out, in] weights")
        out[name] = p
    if not out:
        shown = list(patterns) + (["the decoder blocks' linear layers"] if exact else [])
        raise ZolmError(f"no parameter matches the maskable patterns {shown}; set mask_params")
    return out


def calibration_batches(task: TaskData, recipe: MaskRecipe, pad_id: int) -> list[dict]:
    """The first ``calib_examples`` training examples of the task, in mini-batches of ``calib_batch_size``."""
    items = task.examples[:recipe.calib_examples]
    if not items:
        raise ZolmError(f"task {task.name} has no training example to compute importance from")
    size = recipe.calib_batch_size
    return [training_batch(items[i:i + size], task.kind, pad_id) for i in range(0, len(items), size)]


def _two_batches(task: TaskData, recipe: MaskRecipe, pad_id: int) -> list[dict]:
    """The calibration examples in two mini-batches (or more), for a fisher curvature on a small calibration set."""
    items = task.examples[:recipe.calib_examples]
    if len(items) < 2:
        raise ZolmError(f"task {task.name}: the fisher curvature needs >= 2 calibration examples, got {len(items)}; "
                        "raise mazo_calib_examples or use mazo_curvature activation")
    size = (len(items) + 1) // 2
    log.warning("task %s: %d calibration example(s) make one mini-batch of %d; the fisher curvature needs two or "
                "more: using mini-batches of %d", task.name, len(items), recipe.calib_batch_size, size)
    return [training_batch(items[i:i + size], task.kind, pad_id) for i in range(0, len(items), size)]


def importance_masks(model: nn.Module, weights: dict[str, torch.Tensor], tasks: list[TaskData],
                     recipe: MaskRecipe, pad_id: int) -> tuple[dict[str, torch.Tensor], dict]:
    """MaZO's multi-task mask: ``({name: bool [out, in]}, report)``; the report holds overlap statistics,
    the mean of each importance term per task, and the calibration cost."""
    cfg = recipe.importance
    names = list(weights)
    total: dict[str, torch.Tensor] = {}
    own: dict[str, dict[str, torch.Tensor]] = {}
    terms: dict[str, dict[str, float]] = {}
    t0, examples = time.perf_counter(), 0
    for task in tasks:
        batches = calibration_batches(task, recipe, pad_id)
        if cfg.curvature == "fisher" and len(batches) < 2:  # h = g^2 of one batch: S_global = 1/2 everywhere
            batches = _two_batches(task, recipe, pad_id)
        examples += min(recipe.calib_examples, len(task.examples))
        stats = gradient_stats(model, batches, lambda m, b, k=task.kind: task_loss(m, b, k), names,
                               activations=cfg.curvature == "activation")
        sums = {"global": 0.0, "greedy": 0.0, "magnitude": 0.0}
        own[task.name] = {}
        for name in names:
            for key, v in score_terms(stats[name], weights[name], cfg).items():
                sums[key] += float(v.double().sum())
            score = normalized_task_score(stats[name], weights[name], cfg)
            own[task.name][name] = pack_mask(topk_row_mask(score, recipe.ratio))
            total[name] = total[name].add_(score) if name in total else score  # S = sum_t S_hat^t
            del stats[name]
        numel = sum(w.numel() for w in weights.values())
        terms[task.name] = {k: v / numel for k, v in sums.items()}
    masks = {n: topk_row_mask(total[n], recipe.ratio).cpu() for n in names}
    report = {"overlap": overlap_stats(own, masks, recipe.ratio), "term_means": terms,
              "calibration": {"examples": examples, "seconds": round(time.perf_counter() - t0, 3)}}
    return masks, report


def build_masks(model: nn.Module, weights: dict[str, torch.Tensor], recipe: MaskRecipe,
                tasks: list[TaskData] | None = None, pad_id: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """The masks of ``recipe.kind`` for ``weights`` and a JSON-able report (including the recipe)."""
    report: dict = {}
    if recipe.kind == "importance":
        if not tasks:
            raise ZolmError("an importance mask needs calibration data (at least one task)")
        masks, report = importance_masks(model, weights, tasks, recipe, pad_id)
    elif recipe.kind == "random":
        masks = {n: random_mask(tuple(w.shape), recipe.ratio, derive_seed(recipe.seed, 0x3A5C, i))
                 for i, (n, w) in enumerate(weights.items())}
    else:
        masks = {n: magnitude_mask(w, recipe.ratio).cpu() for n, w in weights.items()}
    numel = sum(w.numel() for w in weights.values())
    report.update(recipe=recipe.to_dict(), tasks=[t.name for t in tasks or []], maskable_numel=numel,
                  masked_numel=sum(int(m.sum()) for m in masks.values()), packed_bytes=sum((w.numel() + 7) // 8
                                                                                         for w in weights.values()))
    return masks, report
