"""The counter-based perturbation generator: determinism, backend agreement and statistics."""

import math

import pytest
import torch

from zolm.errors import ZolmError
from zolm.zo import rng


@pytest.fixture(params=["ih4", "rademacher"])
def sampler(request):
    return request.param


def _with_torch_kernel(monkeypatch, fn):
    monkeypatch.setenv("ZOLM_KERNEL", "torch")
    out = fn()
    monkeypatch.delenv("ZOLM_KERNEL")
    return out


def test_c_kernel_builds():
    assert rng.backend_for(torch.zeros(4)) == "c", "gcc is on every project machine; the C kernel must build"


@pytest.mark.parametrize("n", [1, 7, 1000, 65537, 200_003])
def test_c_and_torch_kernels_agree_bitwise(monkeypatch, sampler, n):
    key = rng.tensor_key(1234, 3)
    p = torch.randn(n, generator=torch.Generator().manual_seed(n))
    a, b = p.clone(), p.clone()
    mask = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.3
    rng.axpy_z_(a, key, 1e-3, sampler)
    _with_torch_kernel(monkeypatch, lambda: rng.axpy_z_(b, key, 1e-3, sampler))
    assert torch.equal(a, b)
    a2, b2 = p.clone(), p.clone()
    rng.axpy_z_(a2, key, -2e-3, sampler, mask=mask)
    _with_torch_kernel(monkeypatch, lambda: rng.axpy_z_(b2, key, -2e-3, sampler, mask=mask))
    assert torch.equal(a2, b2)
    assert torch.equal(rng.draw(n, key, sampler, backend="c"), rng.draw(n, key, sampler, backend="torch"))


def test_draw_is_a_pure_function_of_position(sampler):
    key = rng.tensor_key(99, 0)
    full = rng.draw(10_000, key, sampler)
    for start, n in [(0, 1), (5, 17), (4096, 3000), (9_999, 1)]:
        assert torch.equal(rng.draw(n, key, sampler, start=start), full[start:start + n])


def test_axpy_adds_coef_times_draw():
    key = rng.tensor_key(5, 1)
    p = torch.zeros(5000)
    applied = rng.axpy_z_(p, key, 0.25)
    assert torch.allclose(p, applied * rng.draw(5000, key), rtol=0, atol=1e-7)
    assert abs(applied - 0.25) <= 0.25 * 2 ** -rng.COEF_BITS


def test_masked_coordinates_are_untouched_bitwise():
    p = torch.randn(4000)
    p[::7] = -0.0  # a masked -0.0 must stay -0.0 (p + 0.0 would turn it into +0.0)
    mask = torch.arange(4000) % 3 == 0
    before = p.clone()
    rng.axpy_z_(p, rng.tensor_key(1, 1), 0.1, mask=mask)
    frozen = ~mask
    assert torch.equal(p[frozen].view(torch.int32), before[frozen].view(torch.int32))
    assert (p[mask] != before[mask]).float().mean() > 0.99


def test_statistics_of_z(sampler):
    """Mean 0, variance 1; Irwin-Hall(4): kurtosis 2.7, |z| <= 510/sqrt(21845); no lag correlation."""
    n = 1 << 22
    z = rng.draw(n, rng.tensor_key(2024, 7), sampler).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 10 * se * math.sqrt(2)
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 * se
    other = rng.draw(n, rng.tensor_key(2025, 7), sampler).double()  # another seed: uncorrelated
    assert abs((z * other).mean().item()) < 5 * se
    if sampler == "ih4":
        assert abs((z**4).mean().item() - 2.7) < 0.01
        assert z.abs().max().item() <= 510 / math.sqrt(21845) + 1e-6
        ints = z * math.sqrt(21845)
        assert torch.allclose(ints, ints.round(), atol=1e-6)
    else:
        assert set(z.unique().tolist()) == {-1.0, 1.0}


def test_keys_differ_between_seeds_and_parameters():
    keys = {rng.tensor_key(s, i) for s in range(50) for i in range(50)}
    assert len(keys) == 2500
    assert rng.derive_seed(0, 1, 0) != rng.derive_seed(0, 0, 1)
    assert rng.derive_seed(7, 3) == rng.derive_seed(7, 3)


def test_round_coef_makes_products_exact():
    for c in [1e-3, -2e-3, 3.3e-7, 0.123456789, -17.5]:
        a = rng.round_coef(c)
        assert abs(a - c) <= abs(c) * 2 ** -rng.COEF_BITS
        s = torch.arange(-510, 511, dtype=torch.float64)
        assert torch.equal((s * a).float().double(), s * a), "a * s must be exact in float32"


def test_bad_sampler_is_a_clear_error():
    with pytest.raises(ZolmError, match="unknown sampler 'gauss'.*ih4"):
        rng.axpy_z_(torch.zeros(3), (1, 2), 1.0, "gauss")


def test_mask_packing_round_trips_and_matches_numpy():
    import numpy as np

    for n in [1, 8, 13, 1000]:
        m = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4
        packed = rng.pack_mask(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(rng.unpack_mask(packed, n), m)
        assert packed.tolist() == np.packbits(m.numpy(), bitorder="little").tolist()


def test_packed_and_bool_masks_give_the_same_result(monkeypatch):
    p = torch.randn(70_001)
    mask = torch.rand(70_001, generator=torch.Generator().manual_seed(3)) < 0.1
    a, b, c = p.clone(), p.clone(), p.clone()
    rng.axpy_z_(a, (5, 6), 0.01, mask=mask)
    rng.axpy_z_(b, (5, 6), 0.01, mask=rng.pack_mask(mask))
    _with_torch_kernel(monkeypatch, lambda: rng.axpy_z_(c, (5, 6), 0.01, mask=rng.pack_mask(mask)))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a[~mask], p[~mask]) and not torch.equal(a[mask], p[mask])
