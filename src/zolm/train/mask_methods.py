"""Masked zeroth-order methods: MaZO and MeZO with a random or a magnitude mask of the same ratio.

``--method mazo``                 importance mask (MaZO, Zhang et al. 2025; terms: papers.md 5.3, docs/mazo.md)
``--method mezo-random-mask``     k random coordinates per row
``--method mezo-magnitude-mask``  the k largest |W| per row
All three perturb AND update only the masked coordinates of the maskable weights (papers.md 5.4: masking the
perturbation is what lowers the estimator's dimension and variance); every other parameter stays frozen. The
mask is computed once, before training, saved to ``run_dir/masks.safetensors`` (+ ``masks.json``) and loaded from
there whenever the method is rebuilt in the same directory (resume, ``zolm replay``), so training and replay use
the same mask even if the calibration data were gone.
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
from zolm.train.methods import ZOMethod
from zolm.utils import dist
from zolm.zo.optimizer import ZOConfig, ZOOptimizer
from zolm.zo.spsa import ParamSet

log = logging.getLogger(__name__)

KINDS = {"mazo": "importance", "mezo-random-mask": "random", "mezo-magnitude-mask": "magnitude"}


def recipe_from_config(config: FinetuneConfig) -> MaskRecipe:
    """The mask recipe of a run (what masks.json records and what a reloaded mask must match)."""
    imp = ImportanceConfig(alpha=config.mazo_alpha, beta=config.mazo_beta, curvature=config.mazo_curvature,
                           damping=config.mazo_damping, row_eps=config.mazo_row_eps, term_norm=config.mazo_term_norm)
    return MaskRecipe(kind=KINDS[config.method], ratio=config.mask_ratio, importance=imp,
                      calib_examples=config.mazo_calib_examples, calib_batch_size=config.mazo_calib_batch_size,
                      seed=config.seed)


def calibration_tasks(config: FinetuneConfig) -> tuple[list[TaskData], int]:
    """Each task's first ``mazo_calib_examples`` training examples (same sampling as training) and the pad id."""
    tok = models.load_tokenizer(config.model)
    tasks = []
    for name in config.tasks:
        splits = load_splits(name, config.data_dir, config.num_train, config.num_dev, config.num_test,
                             config.data_seed)
        examples = encode_all(tok, splits.train[:config.mazo_calib_examples], config.max_length)
        tasks.append(TaskData(name, splits.task.kind, examples))
    return tasks, tok.pad_token_id


class MaskedZOMethod(ZOMethod):
    """MeZO over the masked coordinates of the maskable weights (the method name picks the kind of mask)."""

    def __init__(self, model, config: FinetuneConfig, run_dir: Path | None = None):
        if config.method not in KINDS:
            raise ZolmError(f"{config.method} is not a masked method; masked methods: {', '.join(KINDS)}")
        self.weights = maskable_weights(model, config.mask_params or MASKABLE, config.train_params,
                                        config.freeze_params)
        self.masks, self.mask_report = self._masks(model, config, self.weights, run_dir)
        super().__init__(model, config, run_dir)

    def build_optimizer(self, model, config: FinetuneConfig, zo: ZOConfig) -> ZOOptimizer:
        """ZO over the masked coordinates of the maskable weights only (decay stays inside the mask too)."""
        return ZOOptimizer(ParamSet(model, include=[f"^{re.escape(n)}$" for n in self.weights], masks=self.masks), zo)

    @staticmethod
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
