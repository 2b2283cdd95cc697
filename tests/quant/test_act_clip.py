"""clip act: the INT scale search on the rounding error weighted by calibration activations (llama.cpp's imatrix),
its calibration statistics, and the command / recipe stage / fine-tuning paths that use or refuse it."""

import json

import pytest
import torch
from torch import nn

from tests.conftest import CORPUS, write_jsonl
from zolm import models
from zolm.cli import main
from zolm.errors import ZolmError
from zolm.quant import QuantConfig, QuantFormat, QuantLinear, quantize_
from zolm.quant.calibrate import input_importance
from zolm.quant.primitives import CLIP_RATIOS, compute_scales, dequantize, group_view, quantize


def _weighted_err(w, h, fmt, scale):
    e = (dequantize(quantize(w, scale, fmt), scale, fmt) - w).pow(2)
    return group_view(e * h.view(1, -1), fmt.group_size).sum(-1)


def _heavy(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * torch.rand(*shape, generator=gen).pow(3)


def test_act_search_with_uniform_importance_is_the_mse_search():
    w = _heavy((32, 128), 0)
    mse, act = QuantFormat("int", 4, group_size=32, clip="mse"), QuantFormat("int", 4, group_size=32, clip="act")
    assert torch.equal(compute_scales(w, act, torch.full((128,), 3.0)), compute_scales(w, mse))


def test_act_search_minimises_the_weighted_error_over_every_ratio_and_beats_mse_on_it():
    """Per group the chosen ratio is the best of CLIP_RATIOS on sum h_j e_j^2 (ties keep the larger range); with a
    few loud input columns that beats the unweighted search on the weighted error."""
    w = _heavy((48, 128), 1)
    h = torch.ones(128)
    h[torch.randperm(128, generator=torch.Generator().manual_seed(2))[:12]] = 200.0  # a few loud inputs
    act = QuantFormat("int", 4, group_size=32, clip="act")
    s_act, s_mse = compute_scales(w, act, h), compute_scales(w, QuantFormat("int", 4, group_size=32, clip="mse"))
    e_act = _weighted_err(w, h, act, s_act)
    amax = group_view(w, 32).abs().amax(-1)
    for r in CLIP_RATIOS:
        s = (amax * r / act.qmax).half().float()
        assert bool((e_act <= _weighted_err(w, h, act, torch.where(s > 0, s, torch.ones_like(s))) + 1e-9).all())
    e_mse = _weighted_err(w, h, act, s_mse)
    assert bool((e_act <= e_mse + 1e-9).all()) and float(e_act.sum()) < 0.97 * float(e_mse.sum())
    assert not torch.equal(s_act, s_mse)


def test_act_needs_importance_of_the_layer_width_and_an_int_grid():
    fmt = QuantFormat("int", 4, group_size=32, clip="act")
    with pytest.raises(ZolmError, match="zolm quantize --clip act"):
        compute_scales(torch.randn(4, 64), fmt)
    with pytest.raises(ZolmError, match="importance has shape \\(32,\\); the layer has 64 inputs"):
        compute_scales(torch.randn(4, 64), fmt, torch.ones(32))
    with pytest.raises(ZolmError, match="fp8 takes clip none"):
        QuantFormat("fp8", 8, clip="act")


def test_input_importance_is_each_linear_inputs_mean_square(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir)
    ids = torch.randint(3, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    seen = {}
    name = "model.layers.1.mlp.down_proj"
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    imp = input_importance(model, ids, batch_size=2)  # two micro-batches: 2 + 1 sequences
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(imp) == linears
    expect = seen["x"].reshape(-1, seen["x"].shape[-1]).pow(2).mean(0)
    assert torch.allclose(imp[name], expect, rtol=1e-5, atol=1e-7)
    assert imp[name].shape == (model.config.intermediate_size,) and model.training is False
    with pytest.raises(ZolmError, match="must be \\[sequences, tokens\\]"):
        input_importance(model, ids[0])


def test_quantize_with_act_clip_uses_each_layers_importance(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir)
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    imp = input_importance(model, ids)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    qc = QuantConfig(weight=QuantFormat("int", 4, group_size=16, clip="act"), embed_bits=8)
    with pytest.raises(ZolmError, match="no calibration importance for"):
        quantize_(models.load(tiny_llama_dir)[0], qc, importance={})
    quantize_(model, qc, importance=imp)
    for n, q in model.named_modules():
        if isinstance(q, QuantLinear):
            assert torch.equal(q.scale, compute_scales(dense[n], qc.weight, imp[n])), n
    assert model.config.zolm_quantization["weight"]["clip"] == "act"


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    write_jsonl(root / "c4" / "validation.jsonl", [{"text": t} for t in CORPUS * 4])
    return root


def test_quantize_command_with_act_clip_saves_a_model_that_loads(capsys, tiny_llama_dir, calib_dir, tmp_path):
    out = tmp_path / "q4act"
    assert main(["quantize", "--model", tiny_llama_dir, "--bits", "4", "--group-size", "16", "--clip", "act",
                 "--data-dir", str(calib_dir), "--nsamples", "4", "--seqlen", "16", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["format"] == "int4-g16"
    model, _ = models.load(str(out))
    assert model.config.zolm_quantization["weight"]["clip"] == "act"
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert main(["quantize", "--model", tiny_llama_dir, "--clip", "act", "--out", str(tmp_path / "x")]) == 2
    assert "calibration data 'c4' needs a data directory" in capsys.readouterr().err


def test_finetune_refuses_act_clip_on_a_float_model(tiny_llama_dir, data_dir, tmp_path):
    from zolm.train.config import FinetuneConfig
    from zolm.train.loop import finetune

    cfg = FinetuneConfig.of(out=str(tmp_path / "run"), model=tiny_llama_dir, task="sst2", data_dir=data_dir,
                            method="quzo", clip="act", steps=1, batch_size=2, num_train=4, num_dev=2, num_test=2)
    with pytest.raises(ZolmError, match="quantize with `zolm quantize --clip act` first"):
        finetune(cfg, overwrite=True)


def test_recipe_quantize_stage_calibrates_for_act_and_checks_its_keys(tmp_path, tiny_llama_dir, calib_dir):
    from zolm.pipeline import Recipe, run_recipe

    def recipe(stage: str) -> Recipe:
        path = tmp_path / "r.yaml"
        path.write_text(f"model: {tiny_llama_dir}\ndata_dir: {calib_dir}\nout: {tmp_path / 'out'}\n"
                        f"report: {{perplexity: null}}\nstages:\n  - quantize: {stage}\n")
        return Recipe.from_file(str(path))

    with pytest.raises(ZolmError, match="calibration keys \\(nsamples\\) only apply with clip: act"):
        recipe("{bits: 4, group_size: 16, nsamples: 4}")
    with pytest.raises(ZolmError, match="nsamples"):
        recipe("{bits: 4, group_size: 16, clip: act, nsamples: four}")
    summaries = run_recipe(recipe("{bits: 4, group_size: 16, clip: act, nsamples: 4, seqlen: 16}"),
                           echo=lambda s: None)
    model, _ = models.load(str(tmp_path / "out" / "1-quantize" / "model"))
    assert summaries[-1]["stage"] == "quantize"
    assert model.config.zolm_quantization["weight"]["clip"] == "act"


def test_quantize_command_refuses_calibration_options_without_act(capsys, tiny_llama_dir, tmp_path):
    assert main(["quantize", "--model", tiny_llama_dir, "--bits", "4", "--nsamples", "8", "--out",
                 str(tmp_path / "q")]) == 2
    assert "--nsamples: calibration options apply only with --clip act" in capsys.readouterr().err
