"""Wanda++: the regional gradient is the RMS of autograd gradients of the block-output norm; RO lowers the block's
output error and the final prune restores the exact pattern."""

import copy

import pytest
import torch

from tests.prune.conftest import calib_ids, tiny_model
from zolm.blocks import capture_block_inputs, decoder_blocks, linear_layers, out_in
from zolm.prune.calibrate import forward_all
from zolm.prune.regional import regional_gradients, wanda_pp_block_
from zolm.prune.scores import wanda_pp


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_regional_gradient_is_rms_of_autograd_of_the_block_output_norm(kind):
    model = tiny_model(kind)
    ids = calib_ids(3, 10)
    inputs = capture_block_inputs(model, ids)
    block = decoder_blocks(model)[0]
    layers = linear_layers(block)
    dense = torch.empty_like(inputs.hidden)
    G = regional_gradients(block, layers, inputs, dense)

    # Independent path: the full model's hidden state after block 0, one sequence at a time.
    per_sample = []
    for i in range(len(ids)):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids[i:i + 1], output_hidden_states=True).hidden_states[1]
        out.norm().backward()
        per_sample.append({n: out_in(m, m.weight.grad.clone()) for n, m in layers.items()})
        torch.testing.assert_close(dense[i], out.detach()[0], rtol=1e-5, atol=1e-6)
    for n in layers:
        g = torch.stack([s[n] for s in per_sample])
        torch.testing.assert_close(G[n], g.pow(2).mean(0).sqrt(), rtol=1e-4, atol=1e-9)
        assert G[n].shape == out_in(layers[n]).shape
        assert not torch.allclose(G[n], g.mean(0).abs())  # RMS, not the gradient of the summed loss
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_wanda_pp_score_formula():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    x = torch.tensor([3.0, 1.0])
    g = torch.tensor([[0.01, 0.02], [0.0, 0.1]])
    expected = torch.tensor([[(100 * 0.01 + 3) * 1, (100 * 0.02 + 1) * 2], [3 * 0.5, (100 * 0.1 + 1) * 4]])
    torch.testing.assert_close(wanda_pp(w, x, g, 100.0), expected)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_regional_optimization_lowers_block_error_and_keeps_the_mask(nm):
    model = tiny_model("llama", hidden=64)
    inputs = capture_block_inputs(model, calib_ids(12, 16))
    block = decoder_blocks(model)[0]
    errors, logs = {}, {}
    for rounds in (0, 3):
        b = copy.deepcopy(block)
        dense = torch.empty_like(inputs.hidden)
        info = wanda_pp_block_(b, linear_layers(b), inputs, dense, sparsity=0.5, nm=nm, alpha=100.0, rounds=rounds,
                               samples=6, lr=1e-4, generator=torch.Generator().manual_seed(0), batch_size=4)
        errors[rounds] = forward_all(b, inputs, 4, reference=dense)
        logs[rounds] = info["ro"]
        for layer in linear_layers(b).values():
            w = out_in(layer)
            if nm is None:
                assert torch.all((w == 0).sum(1) == w.shape[1] // 2)
            else:
                assert torch.all((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2)
    assert logs[0] == [] and len(logs[3]) == 3
    assert all(r["rel_error_after"] < r["rel_error_before"] for r in logs[3])
    assert errors[3] < 0.8 * errors[0], errors  # RO (with the final re-prune) beats RGS alone on all inputs


def test_ro_keeps_the_block_dtype_and_trains_only_linear_weights():
    model = tiny_model("llama").to(torch.bfloat16)
    inputs = capture_block_inputs(model, calib_ids(6, 8))
    block = decoder_blocks(model)[0]
    norms = {n: p.clone() for n, p in block.named_parameters() if "norm" in n}
    wanda_pp_block_(block, linear_layers(block), inputs, torch.empty_like(inputs.hidden), sparsity=0.5, nm=None,
                    alpha=100.0, rounds=1, samples=3, lr=1e-3, generator=torch.Generator().manual_seed(0),
                    batch_size=2)
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())
    assert all(torch.equal(p, norms[n]) for n, p in block.named_parameters() if n in norms)
