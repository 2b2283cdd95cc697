"""Small ZO updates are applied as asked: the restore and the step are two exact coefficients of one pass."""

import itertools

import pytest
import torch
from torch import nn

from zolm.zo import rng
from zolm.zo.optimizer import ZOConfig, ZOOptimizer
from zolm.zo.spsa import ParamSet

N = 100_000


class Holder(nn.Module):
    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(t)


def _weights(kind: str) -> torch.Tensor:
    if kind == "zeros-f32":  # the C kernel; perturbations are exact on zeros
        return torch.zeros(N)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, generator=g, dtype=torch.float64) * 0.02
    return w if kind == "randn-f64" else w.float()  # torch kernel in float64 / C kernel on real-scale weights


def _applied_along_z(before: torch.Tensor, after: torch.Tensor, seed: int, sampler: str = "ih4") -> float:
    """Least-squares coefficient c of (after - before) = c z."""
    z = rng.draw(N, rng.tensor_key(seed, 0), sampler).double()
    d = after.double() - before.double()
    return float((d * z).sum() / (z * z).sum())


def _one_step(w: torch.Tensor, eps: float, lr: float, g: float) -> tuple[float, float]:
    """(applied update along z, requested -lr g) of one MeZO step whose projected gradient is g."""
    holder = Holder(w.clone())
    opt = ZOOptimizer(ParamSet(holder), ZOConfig(eps=eps, seed=11))
    before = holder.w.detach().clone()
    values = iter([1.0 + g * eps, 1.0 - g * eps])
    rec = opt.step(lambda: next(values), 1, lr)
    seed = rec.seeds[0]
    return _applied_along_z(before, holder.w.detach(), seed), -lr * rec.grads[0]


@pytest.mark.parametrize("kind", ["zeros-f32", "randn-f64"])
def test_update_applied_equals_lr_g_over_the_whole_range(kind):
    w = _weights(kind)
    for lr, eps in itertools.product([1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3], [1e-4, 1e-3, 1e-2]):
        applied, asked = _one_step(w, eps, lr, g=0.3)
        assert abs(applied - asked) <= 1e-3 * abs(asked), (kind, lr, eps, applied, asked)


def test_update_applied_on_float32_weights_of_real_scale():
    """float32 weights of scale 0.02 (ulp ~2e-9): the step survives its three roundings from lr 1e-7 up."""
    w = _weights("randn-f32")
    for lr, eps in itertools.product([1e-7, 1e-6, 1e-5, 1e-3], [1e-4, 1e-3, 1e-2]):
        applied, asked = _one_step(w, eps, lr, g=0.5)
        assert abs(applied - asked) <= 1e-3 * abs(asked), (lr, eps, applied, asked)


def test_one_coefficient_would_not_be_exact():
    """The mechanism the fix replaces: eps - lr g rounded to 14 bits puts lr g on eps's grid."""
    eps, lr, g = 1e-3, 1e-7, 0.3
    std = rng.sampler_std("ih4")
    fused = rng.round_coef((eps - lr * g) / std) * std - rng.round_coef(eps / std) * std
    assert abs(fused + lr * g) > 0.5 * lr * g  # 3e-8 requested, ~6.9e-8 or 0 applied
    two = rng.round_coef(-lr * g / std) * std
    assert abs(two + lr * g) <= 2 ** -14 * lr * g


def test_two_coefficient_pass_is_the_same_on_c_and_torch(monkeypatch):
    key = rng.tensor_key(3, 1)
    p = torch.randn(70_001, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(70_001, generator=torch.Generator().manual_seed(3)) < 0.4
    for m in (None, mask):
        a, b = p.clone(), p.clone()
        rng.axpy_z_(a, key, 1e-3, mask=m, then=-3e-8)
        monkeypatch.setenv("ZOLM_KERNEL", "torch")
        rng.axpy_z_(b, key, 1e-3, mask=m, then=-3e-8)
        monkeypatch.delenv("ZOLM_KERNEL")
        assert torch.equal(a, b)
        if m is not None:
            assert torch.equal(a[~m], p[~m])
