"""Q4_0 / Q8_0 GGUF exports copy zolm's codes and scales: read back with gguf's own reader and dequantizer,
every tensor equals zolm's dequantized weight bit for bit."""

import json

import numpy as np
import pytest
import torch

from zolm import models
from zolm.errors import ZolmError
from zolm.export import export_gguf, gguf_weights
from zolm.quant import QuantConfig, QuantFormat, quantize_
from zolm.quant.ggml import encode_blocks
from zolm.quant.primitives import compute_scales, pack_int4

X = torch.tensor([[1, 5, 9, 13, 20, 31, 7]])


def _read(path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    return r, {t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type).astype(np.float32)) for t in r.tensors}


@pytest.mark.parametrize("fmt,gtype,linear_type", [
    (QuantFormat("int", 4, group_size=32), "q4_0", "Q4_0"),
    (QuantFormat("int", 4, group_size=32), "q8_0", "Q8_0"),
    (QuantFormat("int", 8, group_size=32), "q8_0", "Q8_0"),
    (QuantFormat("int", 8, group_size=32), "q4_0", "Q8_0"),  # INT8 never goes down to 4 bits
    (QuantFormat("int", 8, fp16_scales=True), "q8_0", "Q8_0"),  # per channel: the row scale in every block
], ids=lambda v: getattr(v, "name", v))
def test_int_layers_copy_into_ggml_blocks_bit_for_bit(tiny_llama_dir, tmp_path, fmt, gtype, linear_type):
    from transformers import AutoModelForCausalLM

    model, tok = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(weight=fmt, embed_bits=8))
    models.save(model, tok, tmp_path / "zolm")  # the zolm form, read back: the same codes
    model = models.load(str(tmp_path / "zolm"))[0]
    info = export_gguf(model, tok, tmp_path / "m.gguf", gtype)
    assert info["encodings"] == {"exact": 1 + 7 * model.config.num_hidden_layers, "float": 1 + 2 * 2}
    r, tensors = _read(tmp_path / "m.gguf")
    expected = gguf_weights(model)
    assert set(tensors) == set(expected)
    for name, (ttype, got) in tensors.items():
        assert np.array_equal(got.reshape(expected[name].shape), expected[name]), name
        if name.endswith("norm.weight"):
            assert ttype == "F32"
        elif name == "token_embd.weight":
            assert ttype == "Q8_0"
        else:
            assert ttype == linear_type, name
    assert r.fields["general.file_type"].contents() == {"q4_0": 2, "q8_0": 7}[gtype]
    assert r.fields["general.quantization_version"].contents() == 2
    assert r.fields["llama.attention.key_length"].contents() == 8
    assert r.fields["llama.attention.value_length"].contents() == 8
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the tiny tokenizer is GPT-2's byte-level BPE
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(back(X).logits, model(X).logits, atol=1e-5)


def test_q4_0_block_layout_low_nibbles_hold_the_first_half():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(4).reshape(2, 32)  # two rows, one block each
    q[1] = q[1].flip(0)
    scale = torch.tensor([[0.5], [0.25]])
    fmt = QuantFormat("int", 4, group_size=32)
    raw = encode_blocks(pack_int4(q), scale, fmt, "q4_0")
    assert raw.shape == (2, 18)
    assert raw[0, :2].view(np.float16)[0] == np.float16(0.5)
    u = (q.numpy().astype(np.int16) + 8).astype(np.uint8)
    assert np.array_equal(raw[:, 2:] & 0xF, u[:, :16]) and np.array_equal(raw[:, 2:] >> 4, u[:, 16:])
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    assert np.array_equal(dequantize(raw, GGMLQuantizationType.Q4_0), (q.float() * scale).numpy())


def test_fp16_scales_are_the_default_for_groups_of_32():
    assert QuantFormat("int", 4, group_size=32).fp16_scales and QuantFormat("int", 8, group_size=32).fp16_scales
    assert not QuantFormat("int", 8).fp16_scales and not QuantFormat("fp8", 8, group_size=32).fp16_scales
    assert QuantConfig(weight=QuantFormat("int", 4, group_size=32)).embed_fp16_scales
    w = torch.randn(8, 64)
    s = compute_scales(w, QuantFormat("int", 4, group_size=32))
    assert torch.equal(s.half().float(), s)
    d = QuantConfig.from_dict(QuantConfig(weight=QuantFormat("int", 4, group_size=32)).to_dict())
    assert d.weight.fp16_scales and d.embed_fp16_scales


def test_layers_that_do_not_map_exactly_are_refused_or_requantized(tiny_llama_dir, tmp_path):
    model, tok = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(weight=QuantFormat("int", 8), embed_bits=8))  # per channel, float32 scales
    with pytest.raises(ZolmError, match=r"cannot be copied into Q8_0 exactly: its scales are float32.*--requantize"):
        export_gguf(model, tok, tmp_path / "x.gguf", "q8_0")
    assert not list(tmp_path.iterdir())
    info = export_gguf(model, tok, tmp_path / "x.gguf", "q8_0", requantize=True)
    assert info["encodings"]["requantized"] == 1 + 7 * model.config.num_hidden_layers
    model, tok = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(weight=QuantFormat("int", 4, group_size=16, fp16_scales=True)))
    with pytest.raises(ZolmError, match="groups of 16 columns are not made of 32-column blocks"):
        export_gguf(model, tok, tmp_path / "y.gguf", "q4_0")


def test_float_models_quantize_to_q4_0_with_ggufs_quantizer(tiny_llama_dir, tmp_path):
    model, tok = models.load(tiny_llama_dir)
    info = export_gguf(model, tok, tmp_path / "f.gguf", "q4_0")
    assert info["encodings"] == {"quantized": 1 + 7 * model.config.num_hidden_layers, "float": 1 + 2 * 2}
    _, tensors = _read(tmp_path / "f.gguf")
    assert tensors["blk.0.ffn_up.weight"][0] == "Q4_0"


def test_cli_refuses_an_inexact_q8_0_export_in_one_line(capsys, tiny_llama_dir, tmp_path):
    from zolm.cli import main

    assert main(["quantize", "--model", tiny_llama_dir, "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    code = main(["export", "--model", str(tmp_path / "q"), "--format", "gguf", "--gguf-type", "q8_0",
                 "--out", str(tmp_path / "q.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("zolm: error: ") and len(err.splitlines()) == 1 and "--requantize" in err
    assert main(["export", "--model", str(tmp_path / "q"), "--format", "gguf", "--gguf-type", "q8_0",
                 "--requantize", "--out", str(tmp_path / "q.gguf")]) == 0
    assert main(["quantize", "--model", tiny_llama_dir, "--bits", "8", "--fp16-scales", "on",
                 "--out", str(tmp_path / "q16")]) == 0
    assert main(["export", "--model", str(tmp_path / "q16"), "--format", "gguf", "--gguf-type", "q8_0",
                 "--out", str(tmp_path / "q16.gguf")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["encodings"]["exact"] == 1 + 7 * 2 and "requantized" not in info["encodings"]
