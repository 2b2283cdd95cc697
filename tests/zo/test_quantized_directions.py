"""QuZO's quantized perturbations on float tensors (zolm.zo.quantized_directions): the optimiser's own update is
unbiased with two independent roundings and inflated with one, and a step restores the weights to rounding."""

import pytest
import torch

from tests.helpers import Quadratic
from zolm.errors import ZolmError
from zolm.zo.optimizer import ZOConfig
from zolm.zo.quantized_directions import QuantizedDirectionZO
from zolm.zo.quzo import QuZOSettings
from zolm.zo.spsa import ParamSet


def _mean_update(two_draws: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over n one-query steps (each from the same start) of -(theta_after - theta_before) / lr, and the true
    gradient: the expectation of the optimiser's update direction g u2 (g = u1^T grad for a quadratic)."""
    q = Quadratic(d=10, dtype=torch.float32)
    q.theta.requires_grad_(False)
    start = q.theta.detach().clone()
    opt = QuantizedDirectionZO(ParamSet(q, include=["theta"]), ZOConfig(eps=1e-2, seed=3),
                               QuZOSettings(perturb_bits=2, two_draws=two_draws))
    lr, total = 1e-3, torch.zeros(10, dtype=torch.float64)
    for step in range(1, n + 1):
        q.theta.copy_(start)
        opt.step(lambda: float(q().double()), step, lr)
        total += (start - q.theta).double() / lr
    return total / n, q.A.double() @ start.double()


def test_two_roundings_give_an_unbiased_update_one_rounding_an_inflated_one():
    """papers.md 4.2: E[u1 u2^T] = I with independent roundings; reusing u1 for the update gives I + D (2 bits: the
    rounding variance is large, so the gain is ~2.8x)."""
    two, truth = _mean_update(True, 12000)
    one, _ = _mean_update(False, 12000)
    gain = lambda v: float(v @ truth / (truth @ truth))  # noqa: E731
    assert abs(gain(two) - 1) < 0.08 and float((two - truth).norm() / truth.norm()) < 0.15
    assert gain(one) > 2


def test_a_query_restores_the_weights_before_its_update():
    q = Quadratic(d=64, dtype=torch.float32)
    q.theta.requires_grad_(False)
    start = q.theta.detach().clone()
    opt = QuantizedDirectionZO(ParamSet(q, include=["theta"]), ZOConfig(eps=1e-2, queries=3), QuZOSettings(4))
    opt.step(lambda: float(q()), 1, lr=0.0)
    assert torch.allclose(q.theta, start, atol=1e-6, rtol=0)


def test_refuses_what_it_cannot_do():
    q = Quadratic(d=4, dtype=torch.float64)
    with pytest.raises(ZolmError, match="train float32 tensors; theta is torch.float64"):
        QuantizedDirectionZO(ParamSet(q, include=["theta"]), ZOConfig(), QuZOSettings(4))
    q = Quadratic(d=4, dtype=torch.float32)
    with pytest.raises(ZolmError, match="weight decay is not supported"):
        QuantizedDirectionZO(ParamSet(q, include=["theta"]), ZOConfig(weight_decay=0.1), QuZOSettings(4))
    with pytest.raises(ZolmError, match="perturb_bits >= 1"):
        QuantizedDirectionZO(ParamSet(q, include=["theta"]), ZOConfig(), QuZOSettings(0))
