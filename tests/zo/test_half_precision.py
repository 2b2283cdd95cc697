"""ZO on bfloat16 / float16 weights: exact (float32 masters) and lean (virtual perturbation + SR) modes."""

import logging

import pytest
import torch
from torch import nn

from zolm.errors import ZolmError
from zolm.zo import halfprec, rng
from zolm.zo.optimizer import ZOConfig, ZOOptimizer
from zolm.zo.precision import MASTER_SUFFIX, rounds_away
from zolm.zo.spsa import ParamSet

N = 1 << 20
HALF = [torch.bfloat16, torch.float16]


class Lin(nn.Module):
    """y = x . w, w one flat half tensor; the forward records the weight it saw."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.w.detach().clone())
        return (self.w.float() * x).sum()


def _model(dtype, n=N):
    g = torch.Generator().manual_seed(0)
    return Lin((torch.randn(n, generator=g) * 0.02).to(dtype))


def _step(model, mode, lr, g, eps=1e-3, step=1, wd=0.0):
    opt = getattr(model, "_opt", None) or ZOOptimizer(ParamSet(model), ZOConfig(eps=eps, seed=5, half_mode=mode,
                                                                                weight_decay=wd))
    model._opt = opt
    values = iter([1.0 + g * eps, 1.0 - g * eps])
    x = torch.ones(model.w.numel())

    def loss():
        model(x)
        return next(values)
    rec = opt.step(loss, step, lr)
    return opt, rec


@pytest.mark.parametrize("dtype", HALF)
def test_exact_mode_applies_the_update_to_the_master(dtype):
    model = _model(dtype)
    opt, _ = _step(model, "exact", lr=1e-7, g=0.3)  # 3e-8: ~1/100 of half an fp16 ulp at 0.02
    master = opt.store.masters[0]
    before = model.w.detach().float()  # not moved by this step: far below half an ulp
    z = rng.draw(N, rng.tensor_key(opt.seeds_for(1, 1)[0], 0)).double()
    d = master.double() - _model(dtype).w.detach().float().double()
    got = float((d * z).sum() / (z * z).sum())
    assert abs(got + 1e-7 * 0.3) <= 1e-3 * 3e-8
    assert torch.equal(model.w.detach(), master.to(dtype))
    assert torch.equal(before.to(dtype), model.w.detach())


@pytest.mark.parametrize("dtype", HALF)
def test_lean_mode_mean_update_is_unbiased(dtype):
    model = _model(dtype)
    w0 = model.w.detach().clone()
    opt, rec = _step(model, "lean", lr=1e-5, g=1.0)  # 1e-5: below half an ulp for most bf16 weights
    z = rng.draw(N, rng.tensor_key(rec.seeds[0], 0)).double()
    got = float(((model.w.detach().double() - w0.double()) * z).sum() / (z * z).sum())
    assert abs(got + 1e-5) <= 0.05 * 1e-5
    assert opt.store.master_bytes() == 0


@pytest.mark.parametrize("dtype", HALF)
def test_inplace_mode_loses_small_updates_and_warns(dtype, caplog):
    model = _model(dtype)
    w0 = model.w.detach().clone()
    with caplog.at_level(logging.WARNING):
        _, rec = _step(model, "inplace", lr=1e-7, g=0.3)
    assert "round away" in caplog.text
    z = rng.draw(N, rng.tensor_key(rec.seeds[0], 0)).double()
    got = float(((model.w.detach().double() - w0.double()) * z).sum() / (z * z).sum())
    assert abs(got + 3e-8) > 0.5 * 3e-8  # what the modes above fix


@pytest.mark.parametrize("mode", ["exact", "lean"])
@pytest.mark.parametrize("dtype", HALF)
def test_no_weight_drifts_across_the_two_forwards(dtype, mode):
    model = _model(dtype, n=4096)
    w0 = model.w.detach().clone()
    opt, _ = _step(model, mode, lr=0.0, g=0.7)
    plus, minus = model.seen
    if mode == "lean":  # the stored weights never moved
        assert torch.equal(model.w.detach(), w0)
    assert torch.equal(model.w.detach(), w0)  # lr 0: bit-identical after the step
    z = rng.draw(4096, rng.tensor_key(opt.seeds_for(1, 1)[0], 0))
    ref_plus = (w0.float() + rng.round_coef(1e-3 / rng.sampler_std("ih4")) * rng.sampler_std("ih4") * z).to(dtype)
    assert torch.equal(plus, ref_plus)  # the forward saw half(W + eps z)
    assert not torch.equal(minus, plus)
    if mode == "exact":
        assert torch.equal(opt.store.masters[0], w0.float())


@pytest.mark.parametrize("mode", ["exact", "lean", "inplace"])
def test_half_modes_replay_bit_identically(mode):
    model, twin = _model(torch.bfloat16, 5000), _model(torch.bfloat16, 5000)
    records = []
    for s in range(1, 6):
        opt, rec = _step(model, mode, lr=1e-4, g=(-1) ** s * 0.5, step=s, wd=0.1)
        records.append(rec.to_json())
    again = ZOOptimizer(ParamSet(twin), ZOConfig(eps=1e-3, seed=5, half_mode=mode, weight_decay=0.1))
    for r in records:
        again.replay_(r)
    assert torch.equal(model.w, twin.w)
    if mode == "exact":
        assert torch.equal(opt.store.masters[0], again.store.masters[0])
        assert set(opt.extra_state()) == {"w" + MASTER_SUFFIX}


def test_float32_tensors_stay_in_place_whatever_the_mode():
    model = _model(torch.float32, 1000)
    opt = ZOOptimizer(ParamSet(model), ZOConfig(half_mode="lean"))
    assert opt.store.kinds == ["inplace"] and opt.store.master_bytes() == 0


def test_lean_mode_refuses_a_tensor_its_module_does_not_use():
    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4).to(torch.bfloat16)

        def forward(self, x):  # reads the weight without calling the submodule
            return (x @ self.inner.weight.T).float().sum()

    m = Outside()
    m.used = nn.Linear(4, 1).to(torch.bfloat16)
    forward = m.forward
    m.forward = lambda x: forward(x) + m.used(x).float().sum()
    opt = ZOOptimizer(ParamSet(m, include=[r"inner\.weight", r"used\."]), ZOConfig(half_mode="lean"))
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    with pytest.raises(ZolmError, match="lean cannot perturb inner.weight"):
        opt.step(lambda: float(m(x)), 1, 1e-3)


def test_unknown_half_mode_is_refused():
    with pytest.raises(ZolmError, match="half_mode"):
        ZOConfig(half_mode="fast")


@pytest.mark.parametrize("dtype", HALF)
def test_half_kernels_agree_on_c_and_torch(monkeypatch, dtype):
    n = 70_001
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(n, generator=g) * 0.02)
    w[:500] *= 1e-4  # subnormal float16 values
    w = w.to(dtype)
    mask = torch.rand(n, generator=g) < 0.5
    key, rkey = rng.tensor_key(7, 3), rng.tensor_key(8, 3)

    def run():
        d1, d2 = torch.empty_like(w), torch.empty_like(w)
        halfprec.perturb_half_(d1, w.float(), key, 1e-3, mask=mask)
        halfprec.perturb_half_(d2, w, key, -2e-3)
        m, d3 = w.float().clone(), torch.empty_like(w)
        halfprec.master_step_(m, d3, key, -3e-6, mask=mask, mult=0.999)
        x = w.clone()
        halfprec.sr_step_(x, key, rkey, -1e-6, mult=0.9999)
        return [t.view(torch.int16) if t.dtype != torch.float32 else t for t in (d1, d2, m, d3, x)]

    c = run()
    monkeypatch.setenv("ZOLM_KERNEL", "torch")
    t = run()
    for a, b in zip(c, t):
        assert torch.equal(a, b)


def test_rounding_to_half_matches_torch_on_random_bit_patterns():
    u = torch.randint(-2**31, 2**31 - 1, (500_000,), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    x = u.view(torch.float32)
    x = x[torch.isfinite(x)]
    for dtype in HALF:
        d = torch.empty(x.numel(), dtype=dtype)
        halfprec.perturb_half_(d, x, (1, 2), 0.0)
        assert torch.equal(d.view(torch.int16), x.to(dtype).view(torch.int16))


def test_rounds_away_measures_share_below_half_ulp():
    w = torch.full((1000,), 0.02, dtype=torch.bfloat16)
    assert rounds_away(w, 1e-7, "ih4") == 1.0
    assert rounds_away(w, 1e-2, "ih4") < 0.1
