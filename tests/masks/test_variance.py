"""Masked SPSA: perturbing only the masked coordinates lowers the estimator's error (papers.md 5.4, 9.2)."""

import re

import pytest

from tests.helpers import gradients_and_loss
from zolm import models
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.masks.build import maskable_weights
from zolm.masks.multitask import random_mask
from zolm.masks.variance import estimator_stats, projected_grads
from zolm.zo.spsa import ParamSet


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, data_dir):
    model, tok = models.load(tiny_llama_dir)
    items = encode_all(tok, load_splits("sst2", data_dir, num_train=16, num_dev=0, num_test=0).train)
    batch = training_batch(items, "classification", tok.pad_token_id)
    grads, loss = gradients_and_loss(model, batch)

    weights = maskable_weights(model)
    masks = {n: random_mask(tuple(w.shape), 0.1, seed=i) for i, (n, w) in enumerate(weights.items())}
    return model, loss, grads, masks


def test_masked_perturbation_lowers_the_error_by_the_dimension_ratio(setup):
    model, loss, grads, masks = setup
    seeds = list(range(1, 301))
    full = ParamSet(model, include=[".*"])
    masked = ParamSet(model, include=[f"^{re.escape(n)}$" for n in masks], masks=masks)
    full_sq = sum(float((g.double() ** 2).sum()) for g in grads.values())
    mus_full = projected_grads(loss, full, seeds)
    mus_masked = projected_grads(loss, masked, seeds)
    mezo = estimator_stats(mus_full, seeds, full, grads)
    mazo = estimator_stats(mus_masked, seeds, masked, grads, full_sq=full_sq)
    update_only = estimator_stats(mus_full, seeds, full, grads, update=masks, same_mask=False)
    d_full, d_mask = full.numel(), masked.numel()
    assert mezo["d_eff"] == d_full and mazo["d_eff"] == d_mask == sum(int(m.sum()) for m in masks.values())
    assert d_full > 10 * d_mask
    # MeZO Lemma 2 (n = 1): E||g_hat - g||^2 / ||g||^2 = d + kurtosis - 2 (~ d): the error follows the dimension
    for s, d in ((mezo, d_full), (mazo, d_mask)):
        assert 0.7 * d < s["rel_mse"] < 1.4 * d, (s, d)
        assert s["fd_rel_err"] < 0.05  # mu is the directional derivative z.g up to finite-difference error
    assert mazo["rel_mse"] < mezo["rel_mse"] / 5
    # alignment with the target grows like sqrt(d_full / d_mask) (both are ~ sqrt(2 / (pi d)) in magnitude)
    assert mazo["cos_target"] > 2.5 * mezo["cos_target"] > 0
    assert mazo["cos_full"] == pytest.approx(mazo["cos_target"] * mazo["mass"] ** 0.5, rel=1e-6)
    # masking only the update (perturbing everything) keeps MeZO's noise: the error is ~ d_mask / mass
    assert update_only["d_eff"] == d_mask
    assert update_only["rel_mse"] > 3 * mazo["rel_mse"]
