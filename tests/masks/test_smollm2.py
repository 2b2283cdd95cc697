"""MaZO on the real SmolLM2-135M (slow): exact per-row ratios and a much better-aligned masked estimator."""

import re

import pytest

from tests.conftest import SHARED_DATA
from tests.helpers import gradients_and_loss
from zolm import models
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.masks.build import MaskRecipe, TaskData, build_masks, maskable_weights
from zolm.masks.multitask import check_rows
from zolm.masks.variance import estimator_stats, projected_grads
from zolm.zo.spsa import ParamSet


@pytest.mark.slow
def test_smollm2_importance_mask_and_estimator():
    model, tok = models.load("smollm2-135m")
    tasks = []
    for name in ("sst2", "rte"):
        s = load_splits(name, SHARED_DATA, num_train=32, num_dev=0, num_test=0)
        tasks.append(TaskData(name, s.task.kind, encode_all(tok, s.train, 256)))
    weights = maskable_weights(model)
    assert len(weights) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 blocks
    masks, report = build_masks(model, weights, MaskRecipe(ratio=0.05, calib_examples=16), tasks,
                                tok.pad_token_id)
    check_rows(masks, 0.05)  # 29 of 576 and 77 of 1536 per row
    assert report["overlap"]["pairwise"]["sst2|rte"] > report["overlap"]["chance"]

    batch = training_batch(tasks[0].examples[16:32], "classification", tok.pad_token_id)
    grads, loss = gradients_and_loss(model, batch)

    seeds = list(range(1, 9))
    full = ParamSet(model, include=[".*"])
    masked = ParamSet(model, include=[f"^{re.escape(n)}$" for n in masks], masks=masks)
    mezo = estimator_stats(projected_grads(loss, full, seeds), seeds, full, grads)
    mazo = estimator_stats(projected_grads(loss, masked, seeds), seeds, masked, grads,
                           full_sq=sum(float((g.double() ** 2).sum()) for g in grads.values()))
    assert full.numel() > 20 * masked.numel()
    assert mazo["rel_mse"] < mezo["rel_mse"] / 10
    assert mazo["cos_target"] > 2.5 * mezo["cos_target"]
