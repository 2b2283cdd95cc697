"""Mask trainable sets: ZO perturbs and updates only a mask's coordinates of the maskable weights.

``mask.kind``: importance (MaZO, Zhang et al. 2025; terms: papers.md 5.3, docs/mazo.md), random (k random
coordinates per row) or magnitude (the k largest |W| per row). Masking the perturbation is what lowers the
estimator's dimension and variance (papers.md 5.4); every other parameter stays frozen. On a pruned model the
mask is intersected with the weights' sparsity masks (zeros stay zero). The mask is computed once, before
training, saved to ``run_dir/masks.safetensors`` (+ ``masks.json``) and loaded from there whenever the run is
rebuilt in the same directory (resume, ``zolm replay``), so training and replay use the same mask even if the
calibration data were gone.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from zolm import models
from zolm.data.encode import encode_all
from zolm.data.tasks import load_splits
from zolm.errors import ZolmError
from zolm.masks.build import MASKABLE, MaskRecipe, TaskData, build_masks, maskable_weights
from zolm.masks.importance import ImportanceConfig
from zolm.masks.multitask import MASK_FILE, META_FILE, load_masks, save_masks
from zolm.train.config import FinetuneConfig
from zolm.train.trainables import Trainables, save_plain
from zolm.utils import dist

log = logging.getLogger(__name__)


def recipe_from_config(config: FinetuneConfig) -> MaskRecipe:
    """The mask recipe of a run (what masks.json records and what a reloaded mask must match)."""
    m = config.train.mask
    imp = ImportanceConfig(alpha=m.alpha, beta=m.beta, curvature=m.curvature, damping=m.damping, row_eps=m.row_eps,
                           term_norm=m.term_norm)
    return MaskRecipe(kind=m.kind, ratio=m.ratio, importance=imp, calib_examples=m.calib_examples,
                      calib_batch_size=m.calib_batch_size, seed=config.seed)


def calibration_tasks(config: FinetuneConfig) -> tuple[list[TaskData], int]:
    """Each task's first ``mazo_calib_examples`` training examples (same sampling as training) and the pad id."""
    tok = models.load_tokenizer(config.model)
    tasks = []
    for name in config.tasks:
        splits = load_splits(name, config.data_dir, config.num_train, config.num_dev, config.num_test,
                             config.data_seed)
        examples = encode_all(tok, splits.train[:config.train.mask.calib_examples], config.max_length)
        tasks.append(TaskData(name, splits.task.kind, examples))
    return tasks, tok.pad_token_id


def mask_set(model, config: FinetuneConfig, run_dir: Path | None = None) -> Trainables:
    """The masked coordinates of the maskable weights (block linears unless ``mask.params`` says otherwise)."""
    t = config.train
    weights = maskable_weights(model, t.mask.params or MASKABLE, t.params, t.freeze)
    masks, _ = _masks(model, config, weights, run_dir)
    return Trainables(model, [f"^{re.escape(n)}$" for n in weights], masks=masks, save_model=save_plain)


def _masks(model, config: FinetuneConfig, weights: dict, run_dir: Path | None) -> tuple[dict, dict]:
    recipe = recipe_from_config(config)
    tasks = config.tasks if recipe.kind == "importance" else []
    path = Path(run_dir) if run_dir is not None else None
    if path is not None and (path / MASK_FILE).is_file() and (path / META_FILE).is_file():
        masks, meta = load_masks(path)
        if meta.get("recipe") != recipe.to_dict() or meta.get("tasks") != tasks or set(masks) != set(weights):
            raise ZolmError(f"{path / MASK_FILE} was made by another recipe, task list or model "
                            f"(recipe {meta.get('recipe')}, tasks {meta.get('tasks')}); use another --out")
        log.info("loaded %s masks from %s", recipe.kind, path / MASK_FILE)
        return masks, meta
    calib, pad = calibration_tasks(config) if recipe.kind == "importance" else (None, 0)
    masks, report = build_masks(model, weights, recipe, calib, pad)
    if path is not None and dist.is_main():
        save_masks(path, masks, report)
    log.info("%s mask: %d of %d maskable weights (rho %.4g)", recipe.kind, report["masked_numel"],
             report["maskable_numel"], recipe.ratio)
    return masks, report
