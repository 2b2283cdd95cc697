"""Number formats, rounding, INT4 packing, quantized layers and their save/load."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from zolm import models
from zolm.errors import ZolmError
from zolm.quant import QuantConfig, QuantFormat, QuantLinear, quantize_
from zolm.quant.primitives import (
    compute_scales,
    dequantize,
    fake_quantize,
    fp8_round,
    pack_int4,
    quantize,
    round_stochastic,
    unpack_int4,
)

FORMATS = [QuantFormat("int", 8), QuantFormat("int", 4, group_size=32), QuantFormat("int", 4),
           QuantFormat("fp8", 8, "e4m3", 64), QuantFormat("fp8", 8, "e5m2")]


def test_stochastic_rounding_is_unbiased_and_lands_on_the_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.3, -1.7, 2.5, -0.05, 6.999])
    draws = torch.stack([round_stochastic(x, torch.rand(5, generator=g)) for _ in range(20000)])
    assert torch.equal(draws, draws.round())  # integers
    assert ((draws - x.floor()) >= 0).all() and ((draws - x.floor()) <= 1).all()  # a neighbour of x
    assert torch.allclose(draws.mean(0), x, atol=4 * 0.5 / 20000**0.5)
    assert not torch.allclose(x.round(), x)  # round-to-nearest differs: the test would catch a biased SR


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_fp8_stochastic_rounding_is_unbiased_and_on_the_fp8_grid(variant):
    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[variant]
    g = torch.Generator().manual_seed(1)
    x = torch.tensor([1.3, -0.3, 0.0013, 100.5, -7.77])
    draws = torch.stack([fp8_round(x, variant, torch.rand(5, generator=g)) for _ in range(20000)])
    assert torch.equal(draws, draws.to(dtype).float()), "every draw is an FP8 value"
    assert torch.allclose(draws.mean(0), x, rtol=0.01, atol=1e-4)
    assert draws.unique().numel() <= 10  # two neighbours per value


def test_int4_packing_round_trips():
    q = torch.randint(-8, 8, (7, 10), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 5)
    assert torch.equal(unpack_int4(packed), q)
    with pytest.raises(ZolmError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_quantize_then_dequantize_is_within_half_a_step(fmt):
    """With absmax scales nothing clips, so every weight lands within half a grid step (clip "mse" trades a few
    clipped outliers for a finer grid: tested below)."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    fmt = dataclasses.replace(fmt, clip="none")
    scale = compute_scales(w, fmt)
    err = (dequantize(quantize(w, scale, fmt), scale, fmt) - w).abs()
    if fmt.kind == "int":
        half_step = (scale / 2).repeat_interleave(128 // scale.shape[1], dim=1)
        assert (err <= half_step * (1 + 1e-6)).all()
    else:  # half an FP8 ulp at the value's magnitude: relative 2^-(mantissa bits + 1), plus the subnormal floor
        mant = 3 if fmt.fp8 == "e4m3" else 2
        tiny = scale.repeat_interleave(128 // scale.shape[1], dim=1) * (2.0**-9 if mant == 3 else 2.0**-16)
        assert (err <= w.abs() * 2.0 ** -(mant + 1) + tiny).all()


def test_quant_linear_matches_dequantize_then_linear():
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_linear(lin, QuantFormat("int", 4, group_size=32))
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), x @ q.dequantize().T + lin.bias, atol=1e-6)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (32, 32)  # two codes per byte


def test_bad_formats_are_clear_errors():
    with pytest.raises(ZolmError, match="unsupported bit width 3 for int; valid: 4, 8"):
        QuantFormat("int", 3)
    with pytest.raises(ZolmError, match="unknown number format 'nf4'; valid: int, fp8"):
        QuantFormat("nf4", 4)
    with pytest.raises(ZolmError, match="fp8 is an 8-bit format"):
        QuantFormat("fp8", 4)
    with pytest.raises(ZolmError, match="group_size 48 does not divide the 64 input columns"):
        QuantLinear.from_linear(nn.Linear(64, 8), QuantFormat("int", 8, group_size=48))
    with pytest.raises(ZolmError, match="unsupported bit width 2 for embeddings"):
        QuantConfig(embed_bits=2)


@pytest.mark.parametrize("fmt", [QuantFormat("int", 4, group_size=16), QuantFormat("fp8", 8)], ids=lambda f: f.name)
def test_quantized_model_saves_and_loads_back(tiny_llama_dir, tmp_path, fmt):
    model, tok = models.load(tiny_llama_dir)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    quantize_(model, QuantConfig(weight=fmt, embed_bits=8))
    assert type(model.model.embed_tokens).__name__ == "QuantEmbedding"
    assert type(model.lm_head).__name__ == "QuantTiedHead"  # one copy of the tied codes
    qbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert qbytes < 0.35 * fp32_bytes
    models.save(model, tok, tmp_path / "q")
    loaded, _ = models.load(str(tmp_path / "q"))
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                                                             b.view(torch.uint8) if b.dtype.itemsize == 1 else b)
    x = torch.tensor([[1, 7, 42, 99]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    with pytest.raises(ZolmError, match="already quantized"):
        quantize_(copy.deepcopy(loaded), QuantConfig())
    maps = Path("/proc/self/maps")
    if maps.exists():  # the loaded tensors own their memory: nothing keeps the file mapped (resident)
        assert str(tmp_path / "q") not in maps.read_text()


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.kind == "int"], ids=lambda f: f.name)
@pytest.mark.parametrize("half_scales", [False, True])
def test_native_fake_quantization_matches_torch_bitwise(monkeypatch, fmt, half_scales):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 128, generator=gen) * 0.05
    scale = compute_scales(w, fmt)
    scale = scale.half() if half_scales else scale
    step = scale.float().repeat_interleave(fmt.group_size or 128, dim=1)
    w[0, :64] = step[0, :64] * (torch.arange(64) - 31.5)  # exact halves: round half to even, and the clamp
    w[1, 0], w[1, 1], w[1, 2] = float("nan"), float("inf"), -0.0
    native_result = fake_quantize(w, scale, fmt)
    monkeypatch.setenv("ZOLM_KERNEL", "torch")
    torch_result = fake_quantize(w, scale, fmt)
    assert torch.equal(native_result.nan_to_num(7.0), torch_result.nan_to_num(7.0))
    assert torch.equal(native_result.isnan(), torch_result.isnan())
    assert torch.equal(native_result.signbit(), torch_result.signbit())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_native_dequantization_matches_torch_bitwise(monkeypatch, fmt):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    scale = compute_scales(w, fmt)
    q = quantize(w, scale, fmt)
    native_result = dequantize(q, scale, fmt)
    monkeypatch.setenv("ZOLM_KERNEL", "torch")
    assert torch.equal(native_result, dequantize(q, scale, fmt))


def test_mse_clipped_int4_scales_never_lose_to_absmax_and_stay_fp16():
    """clip "mse" (the INT4 default) picks, per group of 32, the ratio of the absmax range that minimises the
    group's squared error; absmax (ratio 1) is a candidate, so no group gets worse, and on heavy-tailed weights
    the total error drops."""
    from zolm.quant.formats import QuantFormat
    from zolm.quant.primitives import compute_scales, dequantize, group_view, quantize

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.rand(64, 256, generator=gen).pow(3)  # outliers
    errs = {}
    for clip in ("none", "mse"):
        fmt = QuantFormat("int", 4, group_size=32, clip=clip)
        s = compute_scales(w, fmt)
        assert torch.equal(s, s.half().float()), "GGUF Q4_0 scales stay float16"
        q = quantize(w, s, fmt)
        errs[clip] = group_view((dequantize(q, s, fmt) - w).pow(2), 32).sum(-1)
    assert bool((errs["mse"] <= errs["none"] + 1e-12).all())
    assert float(errs["mse"].sum()) < 0.9 * float(errs["none"].sum())
    assert QuantFormat("int", 4).clip == "mse" and QuantFormat("int", 8).clip == "none"
    with pytest.raises(ZolmError, match="unknown clip 'max'"):
        QuantFormat("int", 4, clip="max")


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_head_slices_equal_gathered_rows(bits):
    """QuantTiedHead dequantizes contiguous row ranges: the same logits as gathering those rows by id."""
    from zolm.quant.linear import QuantEmbedding, QuantTiedHead

    emb = nn.Embedding(1003, 24)
    nn.init.normal_(emb.weight, generator=torch.Generator().manual_seed(3))
    qemb = QuantEmbedding.from_embedding(emb, bits)
    head = QuantTiedHead(qemb, chunk=256)
    h = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(4))
    gathered = torch.nn.functional.linear(h, qemb.rows(torch.arange(1003)))
    assert torch.equal(qemb.row_range(100, 357), qemb.rows(torch.arange(100, 357)))
    assert torch.allclose(head(h), gathered, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", [QuantFormat("int", 4, group_size=8), QuantFormat("int", 4),
                                 QuantFormat("int", 8), QuantFormat("fp8", 8, fp8="e4m3")], ids=lambda f: f.name)
def test_fake_quantize_is_the_codes_round_trip_bit_for_bit(fmt):
    """The fake-quant forward (no codes made) equals dequantize(quantize(w)) exactly, ties and clamping too."""
    from zolm.quant.primitives import compute_scales, dequantize, fake_quantize, quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=g) * 0.05
    scale = compute_scales(w, fmt)
    w[0, :8] = 0.5 * scale[0, 0] * torch.tensor([1, 3, 5, -1, -3, 7, 99, -99])  # exact .5 ties, out of range
    before = w.clone()
    assert torch.equal(fake_quantize(w, scale, fmt), dequantize(quantize(w, scale, fmt), scale, fmt))
    assert torch.equal(w, before), "the masters are not touched"
