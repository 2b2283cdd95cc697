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


def test_act_search_per_output_channel():
    """group_size None: one scale per row, the importance spans the whole row."""
    w = _heavy((16, 64), 3)
    h = torch.linspace(0.01, 50.0, 64)
    act = QuantFormat("int", 8, clip="act")
    s = compute_scales(w, act, h)
    assert s.shape == (16, 1)
    e = _weighted_err(w, h, act, s)
    amax = w.abs().amax(-1, keepdim=True)
    for r in CLIP_RATIOS:
        assert bool((e <= _weighted_err(w, h, act, amax * r / act.qmax) + 1e-9).all())


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


def _act_model(model_dir: str, qc: QuantConfig, importance=None):
    model, tok = models.load(model_dir)
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    imp = input_importance(model, ids) if importance is None else importance
    dense = {n: (m.weight.detach().t() if type(m).__name__ == "Conv1D" else m.weight.detach()).clone()
             for n, m in model.named_modules() if n in imp}
    quantize_(model, qc, importance=imp)
    return model, tok, imp, dense, ids


ACT4 = QuantConfig(weight=QuantFormat("int", 4, group_size=16, clip="act"), embed_bits=8)


def test_quantize_with_act_clip_scales_each_layer_on_its_own_importance(tiny_llama_dir):
    """Each layer's scales are the weighted search on that layer's importance (not a neighbour's, not mse's)."""
    model, _, imp, dense, _ = _act_model(tiny_llama_dir, ACT4)
    mse = QuantFormat("int", 4, group_size=16, clip="mse")
    differs = 0
    for n, q in model.named_modules():
        if isinstance(q, QuantLinear):
            assert torch.equal(q.scale, compute_scales(dense[n], ACT4.weight, imp[n])), n
            differs += not torch.equal(q.scale, compute_scales(dense[n], mse))
    assert differs > 0 and model.config.zolm_quantization["weight"]["clip"] == "act"
    with pytest.raises(ZolmError, match="clip act needs calibration importance"):
        quantize_(models.load(tiny_llama_dir)[0], ACT4)


def test_layers_without_calibration_input_fall_back_to_the_mse_search(tiny_llama_dir, caplog):
    model, _ = models.load(tiny_llama_dir)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    imp = input_importance(model, ids)
    name = "model.layers.0.mlp.up_proj"
    w = model.get_submodule(name).weight.detach().clone()
    del imp[name]
    quantize_(model, ACT4, importance=imp)
    assert torch.equal(model.get_submodule(name).scale,
                       compute_scales(w, QuantFormat("int", 4, group_size=16, clip="mse")))
    assert "1 layer(s) saw no calibration input" in caplog.text


def test_gpt2_conv1d_importance_follows_the_input_features(tokenizer, tmp_path):
    """GPT-2's Conv1D stores W as [in, out]; its importance has one entry per input feature, in order."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    model, _, imp, dense, _ = _act_model(str(tmp_path / "gpt2"), ACT4)
    fc = "transformer.h.0.mlp.c_proj"  # Conv1D [in 128, out 32]
    assert imp[fc].shape == (128,) and dense[fc].shape == (32, 128)
    assert torch.equal(model.get_submodule(fc).scale, compute_scales(dense[fc], ACT4.weight, imp[fc]))


def test_an_act_model_round_trips_through_save_and_compressed_tensors(tiny_llama_dir, tmp_path):
    """Loading never re-runs the scale search (it would need calibration): saved codes and scales come back
    exactly, in zolm's folder and in a compressed-tensors export."""
    model, tok, _, _, ids = _act_model(tiny_llama_dir, ACT4)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    models.save(model, tok, tmp_path / "zolm")
    back, _ = models.load(str(tmp_path / "zolm"))
    want = {n: (m.qweight, m.scale) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for n, m in back.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.qweight, want[n][0]) and torch.equal(m.scale, want[n][1]), n
            assert m.fmt.clip == "act"
    assert back.config.zolm_quantization == model.config.zolm_quantization
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref)
    pytest.importorskip("compressed_tensors")
    assert main(["export", "--model", str(tmp_path / "zolm"), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct")]) == 0
    ct, _ = models.load(str(tmp_path / "ct"))
    with torch.no_grad():
        assert torch.allclose(ct(input_ids=ids).logits, ref, atol=1e-5, rtol=0)


def test_float_master_run_over_an_act_model_saves_on_its_grid(tiny_llama_dir, data_dir, tmp_path):
    """quzo-fm over a saved clip-act model rounds onto that model's scales and saves on them (no search)."""
    from zolm.train.config import FinetuneConfig
    from zolm.train.loop import finetune

    model, tok, _, _, _ = _act_model(tiny_llama_dir, ACT4)
    models.save(model, tok, tmp_path / "int4")
    scales = {n: m.scale.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    cfg = FinetuneConfig.of(out=str(tmp_path / "run"), model=str(tmp_path / "int4"), task="sst2", data_dir=data_dir,
                            method="quzo-fm", group_size=16, clip="act", steps=2, batch_size=2, num_train=4,
                            num_dev=0, num_test=2, eval_every=0, eval_before=False, lr=1e-2)
    finetune(cfg, overwrite=True)
    saved, _ = models.load(str(tmp_path / "run" / "model"))
    for n, m in saved.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.scale, scales[n]), n


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
    assert main(["quantize", "--model", tiny_llama_dir, "--clip", "act", "--data-dir", str(calib_dir), "--nsamples",
                 "1", "--seqlen", "4096", "--out", str(tmp_path / "y")]) == 2
    assert "calibration seqlen 4096 is longer than the model's 256 positions" in capsys.readouterr().err
    assert main(["quantize", "--model", str(out), "--clip", "act", "--data-dir", str(calib_dir), "--out",
                 str(tmp_path / "z")]) == 2
    assert "already quantized" in capsys.readouterr().err


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
