"""TT linear layer and TT adapter: exact contraction, parameter counts, initialisation, factorisation."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zolm.adapters import TTAdapter, TTLinear, factorize, tt_num_params
from zolm.errors import ZolmError

SHAPES = [([2, 3], [3, 2], 2), ([8, 8, 9], [4, 4, 4], 5), ([4, 4, 4], [8, 8, 9], 5), ([2, 2, 2, 2], [3, 1, 2, 2], 3),
          ([6], [5], 4)]


def reference_dense(layer: TTLinear) -> torch.Tensor:
    """W [M, N] from the TT definition entry by entry: W(a, b) = G_1[:, a_1, :] ... G_2o[:, b_o, :]."""
    cores = [c.detach().double() for c in layer.cores]
    n, m = layer.in_modes, layer.out_modes
    w = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    for i in range(layer.in_features):
        a, rest = [0] * len(n), i
        for k in reversed(range(len(n))):  # row-major: the last mode varies fastest
            a[k], rest = rest % n[k], rest // n[k]
        for j in range(layer.out_features):
            b, rest = [0] * len(m), j
            for k in reversed(range(len(m))):
                b[k], rest = rest % m[k], rest // m[k]
            prod = torch.ones(1, 1, dtype=torch.float64)
            for g, idx in zip(cores, a + b):
                prod = prod @ g[:, idx, :]
            w[j, i] = prod.item()
    return w


@pytest.mark.parametrize("in_modes,out_modes,rank", SHAPES)
def test_forward_equals_the_matrix_rebuilt_from_the_cores(in_modes, out_modes, rank):
    torch.manual_seed(0)
    layer = TTLinear(in_modes, out_modes, rank, generator=torch.Generator().manual_seed(1)).double()
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
    dense = layer.dense_weight()
    assert dense.shape == (layer.out_features, layer.in_features)
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, rtol=1e-10, atol=1e-12)
    if layer.in_features * layer.out_features <= 64 * 64:
        torch.testing.assert_close(dense, reference_dense(layer), rtol=1e-10, atol=1e-14)


def test_batch_dims_of_size_one_survive():
    layer = TTLinear([2, 3], [3, 2], 2)
    assert layer(torch.randn(1, 1, 6)).shape == (1, 1, 6)  # the reference code's squeeze() would drop them
    assert layer(torch.randn(6)).shape == (6,)


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_forward_never_forms_the_dense_matrix():
    layer = TTLinear([8, 8, 9], [8, 8, 9], 5)
    x = torch.randn(4, 576)
    with torch.no_grad(), _Sizes() as sizes:
        layer(x)
    assert sizes.largest < 576 * 576 // 10, f"an intermediate of {sizes.largest} elements was formed"
    with torch.no_grad(), _Sizes() as sizes:
        layer.dense_weight()
    assert sizes.largest >= 576 * 576  # the probe does see a dense matrix when one is built


@pytest.mark.parametrize("in_modes,out_modes,rank", SHAPES)
def test_parameter_count_matches_the_formula(in_modes, out_modes, rank):
    layer = TTLinear(in_modes, out_modes, rank)
    dims = in_modes + out_modes
    ranks = [1] + [rank] * (len(dims) - 1) + [1]
    formula = sum(ranks[k] * d * ranks[k + 1] for k, d in enumerate(dims)) + math.prod(out_modes)
    assert sum(p.numel() for p in layer.parameters()) == formula == tt_num_params(in_modes, out_modes, rank)
    assert [tuple(c.shape) for c in layer.cores] == [(ranks[k], d, ranks[k + 1]) for k, d in enumerate(dims)]


def test_smollm2_adapter_shapes_and_counts_from_the_spec():
    """papers.md 6.2: TT_down [8,8,9 | 4,4,4], TT_up [4,4,4 | 8,8,9], rank 5: 685 + 665 + 64 + 576 = 1,990."""
    a = TTAdapter(factorize(576), factorize(64), rank=5)
    assert (a.down.in_modes, a.down.out_modes) == ([8, 8, 9], [4, 4, 4])
    assert tt_num_params([8, 8, 9], [4, 4, 4], 5, bias=False) == 685
    assert tt_num_params([4, 4, 4], [8, 8, 9], 5, bias=False) == 665
    assert sum(p.numel() for p in a.parameters()) == 1990
    assert 90 * 1990 == 179_100  # 3 adapters x 30 blocks (the model-level count is tested in test_inject)


def test_initialisation_is_xavier_like_and_seeded():
    """Each rebuilt weight entry has variance 1 / (N + M) (papers.md 6.1), averaged over initialisations."""
    n_in, n_out = [2, 3], [3, 2]
    second = [TTLinear(n_in, n_out, 3, generator=torch.Generator().manual_seed(s)).dense_weight().pow(2).mean()
              for s in range(3000)]
    assert float(torch.stack(second).mean()) == pytest.approx(1 / 12, rel=0.12)
    a, b = (TTLinear(n_in, n_out, 3, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    bound, largest = 1 / math.sqrt(6), float(a.bias.detach().abs().max())
    assert bound / 4 < largest <= bound


def test_adapter_change_scales_with_s_and_vanishes_at_zero():
    x = torch.randn(5, 576)
    outs = {s: TTAdapter([8, 8, 9], [4, 4, 4], 5, scaling=s, generator=torch.Generator().manual_seed(0),
                         init="reference")(x) for s in (0.0, 0.5, 1.0)}
    assert torch.equal(outs[0.0], x)
    torch.testing.assert_close(outs[1.0] - x, 2 * (outs[0.5] - x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,modes,expected", [(576, 3, [8, 8, 9]), (4096, 3, [16, 16, 16]), (64, 3, [4, 4, 4]),
                                              (32, 3, [2, 4, 4]), (768, 3, [8, 8, 12]), (576, 2, [24, 24]),
                                              (4096, 4, [8, 8, 8, 8])])
def test_factorisation_is_balanced(n, modes, expected):
    assert factorize(n, modes) == expected


@pytest.mark.parametrize("n,modes", [(577, 3), (6, 3), (2 * 293, 3), (1, 2)])
def test_sizes_that_do_not_factorise_get_a_clear_error(n, modes):
    with pytest.raises(ZolmError, match=rf"(cannot factorise {n} |size {n} does not factorise)"):
        factorize(n, modes)


def test_bad_layer_arguments():
    with pytest.raises(ZolmError, match="same number of modes"):
        TTLinear([2, 3], [6], 2)
    with pytest.raises(ZolmError, match="expects 6 input features, got 5"):
        TTLinear([2, 3], [3, 2], 2)(torch.randn(2, 5))
    with pytest.raises(ZolmError, match="unknown adapter activation 'tanh'"):
        TTAdapter([2, 3], [2, 2], 2, activation="tanh")


def test_default_init_starts_as_the_identity_and_draws_what_the_reference_draws():
    """zero-up (zolm's default, docs/adazeta.md): TT_up's last core and bias are zero, so Adapter(x) = x exactly at
    any hidden size; every other tensor equals the reference initialisation from the same generator."""
    x = torch.randn(7, 576)
    zero = TTAdapter([8, 8, 9], [4, 4, 4], 5, generator=torch.Generator().manual_seed(3))
    ref = TTAdapter([8, 8, 9], [4, 4, 4], 5, generator=torch.Generator().manual_seed(3), init="reference")
    assert torch.equal(zero(x), x) and not torch.equal(ref(x), x)
    for (name, a), b in zip(zero.named_parameters(), ref.parameters()):
        if name in ("up.core_5", "up.bias"):
            assert not a.any() and b.any()
        else:
            assert torch.equal(a, b), name
    with pytest.raises(ZolmError, match="unknown adapter init 'xavier'"):
        TTAdapter([2, 3], [2, 2], 2, init="xavier")
