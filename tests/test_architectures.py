"""Defaults for every decoder architecture: targets found from the decoder blocks, so quantize, prune, masks and
TT adapters work with no extra flags on tiny random Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, GPT-2 and GPT-NeoX."""

import json

import pytest
import torch

from tests.conftest import _save
from tests.helpers import ARCHITECTURES, tiny_arch
from zolm.blocks import block_linear_names, default_targets, lora_targets, tt_placement
from zolm.cli import main
from zolm.train.presets import PRESETS

LORA = {"phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"]}
MLP = {"phi3": ["gate_up_proj", "down_proj"], "opt": ["fc1", "fc2"], "gpt2": ["c_fc", "c_proj"],
       "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"]}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tokenizer, tmp_path_factory):
    """(kind, model directory) of a tiny random model of each architecture, with the test tokenizer."""
    model = tiny_arch(request.param, len(tokenizer))
    return request.param, _save(model, tokenizer, tmp_path_factory.mktemp(request.param))


def logits(model_dir_or_model, ids):
    from zolm import models

    model = models.load(model_dir_or_model)[0] if isinstance(model_dir_or_model, str) else model_dir_or_model
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 17, 42, 99, 5, 23, 64, 8]])


def test_default_targets_by_structure(arch):
    kind, path = arch
    from zolm import models

    model, _ = models.load(path)
    assert lora_targets(model) == LORA.get(kind, ["q_proj", "v_proj"])
    assert default_targets(model, "mlp") == MLP.get(kind, ["gate_proj", "up_proj", "down_proj"])
    assert len(block_linear_names(model)) == 2 * len(set(default_targets(model, "attention") +
                                                         default_targets(model, "mlp"))) + 2 * (kind == "gpt2")
    placement = tt_placement(model)
    assert placement[-1].endswith(":output") and all(p.endswith(":input") for p in placement[:-1])


def test_quantize_with_no_extra_flags(arch, tmp_path, capsys):
    kind, path = arch
    assert main(["quantize", "--model", path, "--bits", "8", "--out", str(tmp_path / "q")]) == 0, capsys.readouterr()
    from zolm import models
    from zolm.quant.linear import quantized_modules

    expected = set(block_linear_names(models.load(path)[0]))
    model, _ = models.load(str(tmp_path / "q"))
    assert expected <= {n for n, _ in quantized_modules(model)}  # GPT-2's Conv1D layers too
    a, b = logits(path, IDS), logits(model, IDS)
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.3 * a.abs().max()  # INT8 weights + embedding


def test_prune_with_no_extra_flags(arch, tmp_path, capsys):
    kind, path = arch
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog . It was great . " * 40)
    code = main(["prune", "--model", path, "--method", "wanda", "--calib-data", str(text), "--nsamples", "2",
                 "--seqlen", "16", "--out", str(tmp_path / "p")])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert abs(report["sparsity"] - 0.5) < 0.02


def test_masks_and_tt_adapters_with_no_extra_flags(arch):
    kind, path = arch
    from zolm import models
    from zolm.adapters import TTAdapterConfig, add_tt_adapters
    from zolm.adapters.inject import adapter_layers
    from zolm.masks.build import MaskRecipe, build_masks, maskable_weights

    model, _ = models.load(path)
    weights = maskable_weights(model)
    assert sorted(weights) == sorted(f"{n}.weight" for n in block_linear_names(model))
    masks, report = build_masks(model, weights, MaskRecipe(kind="random", ratio=0.25))
    assert report["masked_numel"] > 0 and set(masks) == set(weights)
    base = logits(model, IDS)
    wrapped = add_tt_adapters(model, TTAdapterConfig(rank=2, bottleneck=8, activation="identity", init="reference"))
    assert len(wrapped) == 2 * len(tt_placement(model))
    out = logits(model, IDS)
    assert torch.isfinite(out).all() and not torch.equal(out, base)  # reference init: not the identity
    for name, layer in adapter_layers(model).items():  # identity adapters merge exactly, Conv1D stays Conv1D
        merged = layer.merged()
        assert type(merged) is type(layer.base_layer), name
        x = torch.randn(3, layer.in_features)
        assert torch.allclose(merged(x), layer(x), atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("method", list(PRESETS))
def test_every_method_runs_with_no_extra_flags(arch, data_dir, tmp_path, capsys, method):
    kind, path = arch
    code = main(["finetune", "--model", path, "--data-dir", data_dir, "--method", method, "--steps", "2",
                 "--batch-size", "2", "--num-train", "8", "--num-dev", "2", "--num-test", "2", "--eval-every", "2",
                 "--mazo-calib-examples", "4", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err


def test_mazo_activation_curvature_on_conv1d(tokenizer, data_dir, tmp_path, capsys):
    """GPT-2's Conv1D stores [in, out]: the layer-input statistics index its rows, not its columns."""
    path = _save(tiny_arch("gpt2", len(tokenizer)), tokenizer, tmp_path / "gpt2")
    code = main(["finetune", "--model", path, "--data-dir", data_dir, "--method", "mazo", "--mazo-curvature",
                 "activation", "--steps", "1", "--batch-size", "2", "--num-train", "8", "--num-dev", "0",
                 "--num-test", "2", "--eval-every", "0", "--mazo-calib-examples", "4", "--out", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err
