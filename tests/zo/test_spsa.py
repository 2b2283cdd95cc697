"""SPSA with the seed trick: restore drift, unbiasedness, agreement with the directional derivative."""

import pytest
import torch
from torch import nn

from tests.helpers import Quadratic
from zolm import models
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.eval.scoring import task_loss
from zolm.zo import rng
from zolm.zo.spsa import ParamSet, perturb_, spsa_projected_grad


def _ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


def test_restore_drift_is_bounded_by_three_roundings():
    """+eps z, -2 eps z, +eps z in float32: every coordinate returns within 1.5 ulp(|theta| + 2 eps |z|)."""
    lin = nn.Linear(512, 512)
    params = ParamSet(lin)
    before = [p.detach().clone() for p in params.params]
    eps = 1e-3
    for seed in range(5):
        perturb_(params, seed, eps)
        perturb_(params, seed, -2 * eps)
        perturb_(params, seed, eps)
    for i, (p, b) in enumerate(zip(params.params, before)):
        zmax = 510 / 21845**0.5
        bound = 5 * 1.5 * _ulp(b.abs() + 2 * eps * zmax)  # five round trips
        assert (p.detach() - b).abs().le(bound).all(), f"tensor {i} drifted beyond the documented bound"
    exact = sum(int(torch.equal(p.detach(), b)) for p, b in zip(params.params, before))
    assert exact < len(before), "float32 round trips are not exact; the bound above is what holds"


def test_spsa_is_unbiased_on_a_quadratic():
    q = Quadratic()
    params = ParamSet(q)
    truth = q.grad()

    def mean_estimate(n: int, offset: int) -> torch.Tensor:
        acc = torch.zeros_like(truth)
        for s in range(offset, offset + n):
            g, _, _ = spsa_projected_grad(lambda: q.value(), params, s, 1e-3)
            acc += g * rng.draw(truth.numel(), rng.tensor_key(s, 0)).double()
        return acc / n

    err_small = ((mean_estimate(500, 0) - truth).norm() / truth.norm()).item()
    err_large = ((mean_estimate(8000, 10_000) - truth).norm() / truth.norm()).item()
    assert err_large < 0.2
    assert err_large < err_small / 2, "error must shrink like 1/sqrt(samples)"


def test_projected_grad_equals_directional_derivative_on_tiny_llama(tiny_llama_dir, data_dir):
    model, tok = models.load(tiny_llama_dir, dtype="float64")
    splits = load_splits("sst2", data_dir, num_train=8, num_dev=0, num_test=0)
    batch = training_batch(encode_all(tok, splits.train), "classification", tok.pad_token_id)
    loss = task_loss(model, batch, "classification")
    loss.backward()
    params = ParamSet(model)
    seed = 42
    directional = sum(
        float((p.grad.double().view(-1) * rng.draw(p.numel(), rng.tensor_key(seed, i)).double()).sum())
        for i, p in enumerate(params.params))
    model.zero_grad()
    with torch.no_grad():
        g, lp, lm = spsa_projected_grad(lambda: float(task_loss(model, batch, "classification")), params, seed, 1e-5)
    assert g == pytest.approx(directional, rel=1e-4)


def test_tied_weights_are_perturbed_once(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = ParamSet(model)
    assert "lm_head.weight" not in params.names and "model.embed_tokens.weight" in params.names
    i = params.names.index("model.embed_tokens.weight")
    w = params.params[i]
    before = w.detach().clone()
    applied = perturb_(params, 7, 1e-2)
    z = rng.draw(w.numel(), rng.tensor_key(7, i)).view_as(w)
    assert torch.allclose(w.detach(), before + applied * z, atol=1e-6)


def test_param_selection_by_pattern(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir)
    mlp = ParamSet(model, include=[r"mlp\."])
    assert mlp.names and all(".mlp." in n for n in mlp.names)
    no_norm = ParamSet(model, exclude=["norm"])
    assert not any("norm" in n for n in no_norm.names)


def test_projected_grad_is_the_directional_derivative_on_a_quadratic():
    """For f = 0.5 x^T A x the central difference is exact: (f(x+eps z) - f(x-eps z)) / 2eps = z^T A x."""
    q = Quadratic(d=64)
    params = ParamSet(q)
    for seed in range(5):
        z = rng.draw(64, rng.tensor_key(seed, 0)).double()
        g, _, _ = spsa_projected_grad(q.value, params, seed, 1e-3)
        assert g == pytest.approx(float(z @ q.grad()), rel=1e-6)  # z from draw() is rounded to float32
