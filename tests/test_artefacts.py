"""Every kind of folder zolm writes, opened with plain transformers / peft: zolm's logits, or a loud error.

Never random weights: a folder that only zolm can read must make other tools raise (naming zolm where the tool
prints the folder's own text), and one that they can read must give the logits zolm computes.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zolm import models
from zolm.compressed import save_compressed
from zolm.quant import QuantConfig, QuantFormat, quantize_
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune

X = torch.tensor([[1, 5, 9, 13, 20, 31, 7]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _pruned(tiny_llama_dir):
    model, tok = models.load(tiny_llama_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p[p.abs() < p.abs().median()] = 0.0
    return model, tok


@pytest.mark.parametrize("kind", ["float", "pruned", "int8", "int4"])
def test_model_folders_load_with_zolms_logits_or_refuse(tiny_llama_dir, tmp_path, kind):
    from transformers import LlamaForCausalLM

    model, tok = _pruned(tiny_llama_dir) if kind == "pruned" else models.load(tiny_llama_dir)
    if kind in ("int8", "int4"):
        fmt = QuantFormat("int", 8) if kind == "int8" else QuantFormat("int", 4, group_size=32)
        quantize_(model, QuantConfig(weight=fmt))
    expected = _logits(model)
    models.save(model, tok, tmp_path / kind)
    assert torch.equal(_logits(models.load(str(tmp_path / kind))[0]), expected), "zolm reads its own folder"
    if kind in ("float", "pruned"):
        assert torch.equal(_logits(_plain(tmp_path / kind)), expected)
        return
    with pytest.raises(ValueError, match=r"zolm-int\d.*convert with zolm export --format hf"):
        _plain(tmp_path / kind)
    with pytest.raises(OSError):  # a concrete class ignores model_type, but finds no weights file it knows
        LlamaForCausalLM.from_pretrained(str(tmp_path / kind))


def test_compressed_pruned_folders_refuse_plain_transformers(tiny_llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    model, tok = _pruned(tiny_llama_dir)
    save_compressed(model, tok, tmp_path / "c")
    assert torch.equal(_logits(models.load(str(tmp_path / "c"))[0]), _logits(model))
    with pytest.raises(ValueError, match=r"zolm-compressed.*convert with zolm export --format hf"):
        _plain(tmp_path / "c")
    with pytest.raises(OSError):
        LlamaForCausalLM.from_pretrained(str(tmp_path / "c"))


def _run(tiny_llama_dir, data_dir, out: Path, method: str, **kw) -> Path:
    finetune(FinetuneConfig.of(out=str(out), model=tiny_llama_dir, task="sst2", data_dir=data_dir, method=method,
                            steps=2, batch_size=4, num_train=8, num_dev=4, num_test=4, eval_every=0,
                            eval_batch_size=4, lr=1e-3, **kw))
    return out


@pytest.mark.parametrize("method", ["fo-lora", "mezo-lora"])
def test_lora_adapters_record_the_base_the_user_named_and_load_in_peft(tiny_llama_dir, data_dir, tmp_path, method):
    from peft import PeftModel

    out = _run(tiny_llama_dir, data_dir, tmp_path / "run", method)
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == tiny_llama_dir
    peft_model = PeftModel.from_pretrained(_plain(meta["base_model_name_or_path"]), str(out / "adapter")).eval()
    merged = models.load(str(out / "model"))[0]  # zolm's own result: LoRA merged into the weights
    assert torch.allclose(_logits(peft_model), _logits(merged), atol=1e-5)


def test_tt_adapter_folders_refuse_peft_with_a_message_naming_zolm(tiny_llama_dir, data_dir, tmp_path):
    from peft import PeftConfig, PeftModel

    from zolm.adapters import load_model_with_adapters

    out = _run(tiny_llama_dir, data_dir, tmp_path / "tt", "fo-tt", tt_activation="relu")
    folder = out / "model"
    assert (folder / "adapter_config.json").is_file()
    model, _ = load_model_with_adapters(folder)
    assert model(X).logits.isfinite().all()
    with pytest.raises(KeyError, match="zolm TT adapter"):
        PeftConfig.from_pretrained(str(folder))
    with pytest.raises(KeyError, match="zolm TT adapter"):
        PeftModel.from_pretrained(_plain(tiny_llama_dir), str(folder))
    with pytest.raises(KeyError, match="zolm TT adapter"):  # transformers loads the base, then peft refuses
        _plain(folder)


@pytest.mark.parametrize("fmt,embed_bits,pruned", [
    (QuantFormat("int", 4, group_size=32), 8, False),  # fp16 scales: the embedding's codes come back from its floats
    (QuantFormat("int", 8), 8, True),  # per channel, float32 scales: the codes travel in zolm_extra.safetensors
    (QuantFormat("int", 4, group_size=16), None, False),  # float embedding, tied head
], ids=["int4-g32", "int8-pruned", "int4-g16-float-embedding"])
def test_compressed_tensors_folders_load_in_plain_transformers_and_back_in_zolm(tiny_llama_dir, tmp_path, fmt,
                                                                              embed_bits, pruned):
    pytest.importorskip("compressed_tensors")
    from zolm.cli import main
    from zolm.quant.linear import QuantEmbedding, QuantLinear

    model, tok = _pruned(tiny_llama_dir) if pruned else models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(weight=fmt, embed_bits=embed_bits))
    expected = _logits(model)
    models.save(model, tok, tmp_path / "zolm")
    assert main(["export", "--model", str(tmp_path / "zolm"), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct")]) == 0
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    if pruned:  # half of each layer's weights, zeroed below the median: not 2:4
        assert cfg["quantization_config"]["sparsity_config"]["sparsity_structure"] == "unstructured"
    assert torch.equal(_logits(_plain(tmp_path / "ct")), expected), "plain transformers: zolm's logits"
    back = models.load(str(tmp_path / "ct"))[0]
    assert torch.equal(_logits(back), expected)
    mine = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}
    theirs = {n: m for n, m in back.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}
    assert set(mine) == set(theirs)
    for name, m in mine.items():  # the same codes and scales: training resumes on exactly this model
        assert torch.equal(m.qweight, theirs[name].qweight) and torch.equal(m.scale, theirs[name].scale), name
        if isinstance(m, QuantLinear) and m.sparsity_mask is not None:
            assert torch.equal(m.sparsity_mask, theirs[name].sparsity_mask)


def test_zolm_reads_foreign_compressed_tensors_checkpoints(tiny_llama_dir, tmp_path):
    """A pack-quantized folder without zolm's own keys (as llm-compressor writes it) loads for training."""
    pytest.importorskip("compressed_tensors")
    from zolm.quant.ct import save_ct

    model, tok = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(weight=QuantFormat("int", 4, group_size=32), embed_bits=None))
    save_ct(model, tok, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    del cfg["zolm_quantization"]
    (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
    back = models.load(str(tmp_path / "ct"))[0]
    assert back.config.zolm_quantization["weight"]["group_size"] == 32
    assert torch.equal(_logits(back), _logits(model))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
    from zolm.errors import ZolmError

    with pytest.raises(ZolmError, match="symmetric INT4/INT8"):
        models.load(str(tmp_path / "ct"))


def test_2_4_int4_compressed_tensors_keeps_its_zeros_in_plain_transformers(tiny_llama_dir, tmp_path):
    """2:4 magnitude pruning + INT4 g32 -> zolm export --format compressed-tensors: the folder declares the 2:4
    sparsity (compressed-tensors' own config class parses it), and plain transformers' decompressed weights have
    zeros wherever zolm's masks do, with zolm's logits."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.config import SparsityCompressionConfig

    from zolm.cli import main
    from zolm.prune import PruneConfig, prune_
    from zolm.quant.linear import QuantLinear
    from zolm.utils.sparse import unpack_mask

    model, tok = models.load(tiny_llama_dir)
    prune_(model, PruneConfig(method="magnitude", nm="2:4"))
    quantize_(model, QuantConfig(weight=QuantFormat("int", 4, group_size=32), embed_bits=8))
    masks = {n: unpack_mask(m.sparsity_mask, m.in_features * m.out_features).view(m.out_features, m.in_features)
             for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(masks) == 7 * model.config.num_hidden_layers and all(m.float().mean() == 0.5 for m in masks.values())
    expected = _logits(model)
    models.save(model, tok, tmp_path / "zolm")
    assert main(["export", "--model", str(tmp_path / "zolm"), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct")]) == 0
    sparse = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    parsed = SparsityCompressionConfig.load_from_registry(sparse["format"], **sparse)
    assert (parsed.format, parsed.sparsity_structure, parsed.targets) == ("dense", "2:4", ["Linear"])
    assert parsed.global_sparsity == 0.5
    plain = _plain(tmp_path / "ct")
    assert torch.equal(_logits(plain), expected), "plain transformers: zolm's logits"
    for name, keep in masks.items():  # decompressed by the first forward pass
        w = plain.get_submodule(name).weight
        assert not w[~keep].any(), name
        assert torch.equal(w, model.get_submodule(name).dequantize()), name


def test_unpruned_compressed_tensors_folders_declare_no_sparsity(tiny_llama_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from zolm.quant.ct import save_ct

    model, tok = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(weight=QuantFormat("int", 4, group_size=32)))
    save_ct(model, tok, tmp_path / "ct")
    assert "sparsity_config" not in json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_tt_adapter_directories_merge_into_plain_transformers_or_name_zolm(tiny_llama_dir, data_dir, tmp_path,
                                                                         activation, capsys):
    """zolm export --format hf merges an identity TT adapter directory into a plain model with zolm's logits;
    a ReLU one is refused in one line (nothing but zolm runs it), and zolm eval takes both directories."""
    from zolm.adapters import load_model_with_adapters
    from zolm.cli import main

    out = _run(tiny_llama_dir, data_dir, tmp_path / "tt", "fo-tt", tt_activation=activation, tt_rank=2,
               tt_bottleneck=8)
    adapted = load_model_with_adapters(out / "adapter")[0]
    status = main(["export", "--model", str(out / "adapter"), "--format", "hf", "--out", str(tmp_path / "hf")])
    if activation == "identity":
        assert status == 0
        torch.testing.assert_close(_logits(_plain(tmp_path / "hf")), _logits(adapted), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_logits(_plain(out / "model")), _logits(adapted), rtol=1e-5, atol=1e-5)
    else:
        assert status == 2 and not (tmp_path / "hf").exists()
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "relu TT adapters, which do not fold" in err and "zolm eval" in err
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat . " * 20)
    assert main(["eval", "--model", str(out / "adapter"), "--perplexity", str(text), "--seq-len", "16"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert ppl > 1 and np.isfinite(ppl)
