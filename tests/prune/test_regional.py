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
                               samples=6, lr=1e-4, generator=torch.Generator().manual_seed(0), batch_size=4,
                               log_errors=True)
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
    assert logs[3][-1]["rel_loss"] < logs[3][0]["rel_loss"]  # the free log: the training loss falls too
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


def test_ro_diagnostic_passes_do_not_change_the_result():
    """``log_errors`` only adds forwards: the pruned block is bit-identical with and without it."""
    model = tiny_model("llama", hidden=64)
    inputs = capture_block_inputs(model, calib_ids(8, 12))
    block = decoder_blocks(model)[0]
    out = {}
    for log_errors in (False, True):
        b = copy.deepcopy(block)
        dense = torch.empty_like(inputs.hidden)
        info = wanda_pp_block_(b, linear_layers(b), inputs, dense, sparsity=0.5, nm=(2, 4), alpha=100.0, rounds=2,
                               samples=4, lr=1e-4, generator=torch.Generator().manual_seed(0), batch_size=4,
                               log_errors=log_errors)
        out[log_errors] = ([m.weight.detach().clone() for m in linear_layers(b).values()], info)
    assert all(torch.equal(a, b) for a, b in zip(out[False][0], out[True][0]))
    assert [r["rel_loss"] for r in out[False][1]["ro"]] == [r["rel_loss"] for r in out[True][1]["ro"]]
    assert "rel_error_before" not in out[False][1]["ro"][0] and 0 < out[False][1]["rel_error_ro"] < 1


class _ZeroThatRunsTheGradients(float):
    """0.0 that does not compare equal to 0: Wanda++ then computes G and multiplies it by zero."""

    def __eq__(self, other):
        return False

    __hash__ = float.__hash__


def test_alpha_0_skips_the_backward_and_gives_the_same_block():
    model = tiny_model("llama", hidden=64)
    inputs = capture_block_inputs(model, calib_ids(8, 12))
    block = decoder_blocks(model)[0]
    out = []
    for alpha in (0.0, _ZeroThatRunsTheGradients(0.0)):
        b = copy.deepcopy(block)
        dense = torch.empty_like(inputs.hidden)
        wanda_pp_block_(b, linear_layers(b), inputs, dense, sparsity=0.5, nm=None, alpha=alpha, rounds=2, samples=4,
                        lr=1e-4, generator=torch.Generator().manual_seed(0), batch_size=4)
        out.append(([m.weight.detach().clone() for m in linear_layers(b).values()], dense))
    # the dense pass runs batched instead of one sequence at a time: the same up to float rounding
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a == 0, b == 0) for a, b in zip(out[0][0], out[1][0]))  # the same masks
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
