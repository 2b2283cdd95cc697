"""The fake-quant base's weight parametrization: the forward sees Q(W) exactly, gradients pass straight through."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from zolm.quant.formats import QuantFormat
from zolm.quant.primitives import compute_scales, fake_quantize
from zolm.train.base_weights import STEQuant

FMT = QuantFormat("int", 4, group_size=8)


def _layer(transposed: bool, fixed: bool) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(16, 6, bias=False)
    w = lin.weight.detach().clone()  # [out, in]
    if transposed:  # a GPT-2 Conv1D stores [in, out]
        lin.weight = nn.Parameter(w.t().contiguous())
    scale = compute_scales(w, FMT) if fixed else None
    parametrize.register_parametrization(lin, "weight", STEQuant(FMT, scale, transposed), unsafe=True)
    return lin, w


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("fixed", [False, True])
def test_forward_is_exactly_the_fake_quantized_weight(transposed, fixed):
    lin, w = _layer(transposed, fixed)
    want = fake_quantize(w, compute_scales(w, FMT), FMT)
    got = lin.weight.t() if transposed else lin.weight
    assert torch.equal(got, want)
    with torch.no_grad():  # the ZO path: no autograd function, the same values
        got = lin.weight.t() if transposed else lin.weight
        assert torch.equal(got, want)
    assert lin.weight.is_contiguous()
    assert not torch.equal(want, w)  # the grid really moves the weight


@pytest.mark.parametrize("transposed", [False, True])
def test_gradient_passes_straight_through(transposed):
    lin, _ = _layer(transposed, fixed=True)
    c = torch.randn_like(lin.weight)
    (lin.weight * c).sum().backward()
    master = lin.parametrizations.weight.original
    assert torch.equal(master.grad, c)  # dQ/dW := I
