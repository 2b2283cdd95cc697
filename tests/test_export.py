"""Exports: dense safetensors from low-bit models, and GGUF that follows llama.cpp's conventions."""

import pytest
import torch

from zolm import models
from zolm.errors import ZolmError
from zolm.export import export_gguf, gguf_name, to_dense
from zolm.quant import QuantConfig, QuantFormat, quantize_

X = torch.tensor([[1, 5, 9, 13, 20, 31, 7]])


@pytest.mark.parametrize("tensor_type,tol", [("f32", 0.0), ("f16", 5e-3), ("q8_0", 5e-2)])
def test_gguf_reloads_with_the_same_logits(tiny_llama_dir, tmp_path, tensor_type, tol):
    """transformers' GGUF loader applies llama.cpp's conventions in reverse: identical logits (f32) prove the
    names, the Q/K permutation and the hyper-parameters are right."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model, tok = models.load(tiny_llama_dir)
    info = export_gguf(model, tok, tmp_path / "m.gguf", tensor_type)
    assert info["tensors"] == 2 + 9 * model.config.num_hidden_layers  # embedding, final norm, 9 per block
    r = GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == model.config.num_hidden_layers
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<pad>", "<s>", "</s>"]
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight" in names and "token_embd.weight" in names and "output.weight" not in names
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (back(X).logits - model(X).logits).abs().max().item() <= tol + 1e-6


def test_low_bit_models_export_dense_and_to_gguf(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(weight=QuantFormat("int", 4, group_size=16)))
    with torch.no_grad():
        expected = model(X).logits
    export_gguf(model, tok, tmp_path / "q.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    models.save(to_dense(model), tok, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        assert torch.allclose(plain(X).logits, expected, atol=1e-5)
        assert torch.allclose(back(X).logits, expected, atol=1e-4)


def test_gguf_names_and_errors(tiny_opt_dir, tmp_path):
    assert gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert gguf_name("model.layers.0.self_attn.k_proj.weight") == "blk.0.attn_k.weight"
    assert gguf_name("model.rotary_emb.inv_freq") is None
    model, tok = models.load(tiny_opt_dir)
    with pytest.raises(ZolmError, match="supports the Llama family"):
        export_gguf(model, tok, tmp_path / "x.gguf")
    with pytest.raises(ZolmError, match="unknown GGUF tensor type 'q2'"):
        export_gguf(model, tok, tmp_path / "x.gguf", "q2")
    assert not list(tmp_path.iterdir()), "a failed export leaves no file behind"


@pytest.mark.slow
def test_smollm2_gguf_round_trip_keeps_its_tokenizer(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = smollm2
    info = export_gguf(model, tok, tmp_path / "s.gguf", "f16")
    assert info["tokenizer"] == "copied"
    tok2 = AutoTokenizer.from_pretrained(tmp_path, gguf_file="s.gguf")
    text = "Zeroth-order fine-tuning costs two forward passes."
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="s.gguf", dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max().item() < 0.1


@pytest.mark.slow
def test_smollm2_vocabulary_gets_llama_cpps_pre_tokenizer_name(smollm2_tokenizer):
    from zolm.gguf_tokenizer import detect_pre, tokenizer_fields

    tok = smollm2_tokenizer
    assert detect_pre(tok) == "smollm"
    fields, how = tokenizer_fields(tok, None)
    assert how == "built" and fields["tokenizer.ggml.pre"][0] == "smollm"
