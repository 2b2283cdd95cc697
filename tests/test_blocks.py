"""Generic decoder-block discovery, block-0 input capture and single-block execution on several families."""

import pytest
import torch
from torch import nn

from tests.prune.conftest import calib_ids, tiny_model
from zolm.blocks import capture_block_inputs, decoder_blocks, find_block_list, linear_layers, out_in, run_block
from zolm.errors import ZolmError

FAMILIES = ["llama", "qwen2", "mistral", "opt", "gpt2"]
EXPECTED = {
    "llama": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "opt": ("model.decoder.layers", ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                     "self_attn.out_proj", "fc1", "fc2"]),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
}


@pytest.mark.parametrize("kind", FAMILIES)
def test_blocks_and_linears_are_found_by_structure(kind):
    model = tiny_model(kind, layers=3)
    name, blocks = find_block_list(model)
    assert len(blocks) == 3 and decoder_blocks(model) is blocks
    layers = linear_layers(blocks[0])
    if kind in EXPECTED:
        assert (name, list(layers)) == EXPECTED[kind]
    else:  # Qwen2 and Mistral share Llama's layout
        assert (name, list(layers)) == EXPECTED["llama"]
    head = model.get_output_embeddings()
    assert all(layer is not head for b in blocks for layer in linear_layers(b).values())


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chaining_blocks_reproduces_the_model(kind, attn):
    """Block-0 inputs equal the model's; running each block on micro-batches gives the next block's inputs."""
    model = tiny_model(kind, layers=3)
    model.set_attn_implementation(attn)
    ids = calib_ids(5, 12)
    inputs = capture_block_inputs(model, ids)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(inputs.hidden, states[0], rtol=0, atol=1e-6)
        h = inputs.hidden
        for i, block in enumerate(decoder_blocks(model)[:-1]):  # the last hidden state is after the final norm
            h = torch.cat([run_block(block, inputs, h[j:j + 2]) for j in range(0, 5, 2)])
            torch.testing.assert_close(h, states[i + 1], rtol=1e-5, atol=1e-5)


def test_capture_restores_the_block_list_and_skips_later_blocks():
    model = tiny_model("llama", layers=3)
    calls = []
    blocks = model.model.layers
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    capture_block_inputs(model, calib_ids(2, 8))
    assert calls == [0, 0] and len(model.model.layers) == 3
    for h in handles:
        h.remove()


def test_conv1d_weights_are_seen_as_out_in():
    model = tiny_model("gpt2")
    fc = linear_layers(decoder_blocks(model)[0])["mlp.c_fc"]  # Conv1D(nf=4h, nx=h): weight [in, out]
    assert fc.weight.shape == (32, 128) and out_in(fc).shape == (128, 32)
    out_in(fc)[3].zero_()  # a write through the view reaches output neuron 3 of the stored weight
    assert torch.all(fc.weight[:, 3] == 0)
    x = torch.randn(2, 32)
    torch.testing.assert_close(fc(x), x @ out_in(fc).t() + fc.bias)


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10)


def test_model_without_blocks_gets_a_clear_error():
    with pytest.raises(ZolmError, match=r"^cannot find the decoder blocks of NoBlocks: no nn.ModuleList"):
        decoder_blocks(NoBlocks())


def test_block_without_linears_gets_a_clear_error():
    with pytest.raises(ZolmError, match="has no linear layers"):
        linear_layers(nn.Sequential(nn.ReLU()))


def test_bad_calibration_shape_is_reported():
    with pytest.raises(ZolmError, match=r"non-empty \[N, L\] tensor"):
        capture_block_inputs(tiny_model("llama"), torch.zeros(5, dtype=torch.long))
