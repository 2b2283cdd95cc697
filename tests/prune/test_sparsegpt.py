"""SparseGPT on a single layer: exact patterns, lower reconstruction error than magnitude and Wanda."""

import pytest
import torch
from torch import nn

from zolm.prune.masks import apply_mask_, make_mask
from zolm.prune.scores import magnitude, wanda
from zolm.prune.sparsegpt import SparseGPT, expected_zeros


def layer_and_inputs(seed=0, d_in=64, d_out=32, tokens=512):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.1)
    # correlated inputs with uneven feature scales, as real activations have
    mix = torch.randn(d_in, d_in, generator=g) / d_in ** 0.5 + torch.eye(d_in)
    scale = torch.exp(torch.randn(d_in, generator=g))
    x = (torch.randn(4, tokens // 4, d_in, generator=g) @ mix) * scale
    return layer, x


def recon_error(w_dense, w, x):
    x = x.reshape(-1, x.shape[-1])
    return float((x @ w_dense.t() - x @ w.t()).pow(2).sum())


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.7, None), (None, (2, 4)), (None, (4, 8))])
def test_sparsegpt_beats_magnitude_and_wanda_on_layer_error(sparsity, nm):
    layer, x = layer_and_inputs()
    dense = layer.weight.detach().clone()
    s = 0.5 if sparsity is None else sparsity
    solver = SparseGPT(layer)
    solver.add_batch(x[:2])
    solver.add_batch(x[2:])
    solver.prune(s, nm, blocksize=16)
    solver.free()
    err_sgpt = recon_error(dense, layer.weight.detach(), x)
    mag = apply_mask_(dense.clone(), make_mask(magnitude(dense), s, nm, "layer"))
    norm = (x.reshape(-1, 64).pow(2).sum(0) / 4).sqrt()
    wan = apply_mask_(dense.clone(), make_mask(wanda(dense, norm), s, nm, "row"))
    assert err_sgpt < recon_error(dense, wan, x) < recon_error(dense, mag, x)
    w = layer.weight.detach()
    if nm is None:
        assert int((w == 0).sum()) == expected_zeros(32, 64, s, 16)
    else:
        assert torch.all((w == 0).view(32, -1, nm[1]).sum(-1) == nm[1] - nm[0])


def test_sparsity_zero_leaves_the_weight_unchanged():
    layer, x = layer_and_inputs(seed=1)
    dense = layer.weight.detach().clone()
    solver = SparseGPT(layer)
    solver.add_batch(x)
    solver.prune(0.0)
    assert torch.equal(layer.weight, dense)


def test_dead_inputs_are_zeroed_and_counted_as_pruned():
    layer, x = layer_and_inputs(seed=2)
    x[..., 5] = 0  # input feature 5 never fires
    solver = SparseGPT(layer)
    solver.add_batch(x)
    solver.prune(0.25, blocksize=64)
    w = layer.weight.detach()
    assert torch.all(w[:, 5] == 0) and int((w == 0).sum()) == round(0.25 * w.numel())
