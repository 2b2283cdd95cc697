"""QuZO's C kernels against their torch mirrors, bit for bit, on random codes, scales and masks: odd shapes, rows
longer than a kernel chunk, groups that straddle chunks, INT4 / INT8 / FP8, dense and masked."""

import pytest
import torch

from zolm.quant.formats import QuantFormat
from zolm.quant.linear import QuantLinear
from zolm.quant.primitives import quantize
from zolm.utils import native
from zolm.utils.sparse import pack_mask
from zolm.zo import quzo
from zolm.zo.rng import tensor_key

pytestmark = pytest.mark.skipif(native.lib() is None, reason="no C compiler: nothing to compare")

KEY, RKEY, UKEY = tensor_key(11, 2), tensor_key(12, 2), tensor_key(13, 2)
# (rows, cols, format): per-row and grouped scales, odd INT8 widths, INT4 rows of several kernel chunks (2048
# columns) whose groups of 20 or 6 straddle the chunk boundaries
CASES = [
    (5, 7, QuantFormat("int", 8)),
    (9, 4100, QuantFormat("int", 8, group_size=20)),
    (3, 70001, QuantFormat("int", 8)),
    (13, 6, QuantFormat("int", 4, group_size=3)),
    (7, 4100, QuantFormat("int", 4, group_size=20)),
    (4, 4098, QuantFormat("int", 4)),
    (6, 96, QuantFormat("int", 4, group_size=32)),
    (5, 2052, QuantFormat("fp8", 8, "e4m3", group_size=6)),
    (3, 35, QuantFormat("fp8", 8, "e5m2")),
]


def _layer(rows: int, cols: int, fmt: QuantFormat, masked: bool, seed: int = 0) -> QuantLinear:
    """Random codes over the whole range (extremes included), scales over three decades, an optional random mask."""
    g = torch.Generator().manual_seed(seed + rows * cols)
    q = QuantLinear(cols, rows, fmt)
    q.scale.copy_(10 ** (torch.rand(q.scale.shape, generator=g) * 3 - 4))
    if fmt.kind == "fp8":
        w = torch.randn(rows, cols, generator=g) * q.scale.repeat_interleave(cols // q.scale.shape[1], 1) * 50
        q.qweight.copy_(quantize(w, q.scale, fmt))
    elif fmt.bits == 4:
        q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, generator=g).to(torch.uint8))
    else:
        q.qweight.copy_(torch.randint(int(fmt.qmin), int(fmt.qmax) + 1, q.qweight.shape, generator=g).to(torch.int8))
    if masked:
        q.sparsity_mask = pack_mask(torch.rand(rows, cols, generator=g) < 0.6)
    return q


def _torch(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setenv("ZOLM_KERNEL", "torch")
        assert native.lib() is None
        return fn()


@pytest.mark.parametrize("rows,cols,fmt", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_dequant_perturb_equals_dequantize_then_perturb(monkeypatch, rows, cols, fmt, masked):
    """One pass (zolm_quzo_dequant_perturb_*) = C dequantize + C perturb = the torch mirror of both."""
    q = _layer(rows, cols, fmt, masked)
    for a, L in ((3e-4, 7), (-1.5e-3, 127), (2e-5, 0), (4e-3, 1)):
        fused = quzo.perturbed_weight(q, KEY, RKEY, a, L)
        two = q.dequantize()
        quzo.perturb_weight_(two, KEY, RKEY, a, L, q.sparsity_mask)
        mirror = _torch(monkeypatch, lambda a=a, L=L: quzo.perturbed_weight(q, KEY, RKEY, a, L))
        assert torch.equal(fused.view(torch.int32), two.view(torch.int32)), (a, L)
        assert torch.equal(fused.view(torch.int32), mirror.view(torch.int32)), (a, L)
        if masked:  # masked positions keep their dequantized value exactly
            keep = torch.zeros(rows * cols, dtype=torch.bool)
            plain = q.dequantize().view(-1)
            keep = (q.sparsity_mask.repeat_interleave(8)[:rows * cols] >> torch.arange(8).repeat(rows * cols // 8 + 1)
                    [:rows * cols].to(torch.uint8)) & 1 == 1
            assert torch.equal(fused.view(-1)[~keep], plain[~keep])


@pytest.mark.parametrize("rows,cols,fmt", [c for c in CASES if c[2].kind == "int"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rtn", [False, True])
def test_code_updates_equal_the_torch_mirror(monkeypatch, rows, cols, fmt, masked, rtn):
    """zolm_quzo_update_int8/int4 = _int_update_chunk, small steps (mostly SR noise) and huge ones (clamps)."""
    for c, L in ((2e-4, 7), (-7e-2, 127), (3e-6, 0), (5.0, 1)):
        a, b = _layer(rows, cols, fmt, masked, seed=1), _layer(rows, cols, fmt, masked, seed=1)
        before = a.qweight.clone()
        quzo.update_codes_(a, KEY, RKEY, UKEY, c, L, rtn)
        _torch(monkeypatch, lambda b=b, c=c, L=L: quzo.update_codes_(b, KEY, RKEY, UKEY, c, L, rtn))
        assert torch.equal(a.qweight.view(torch.uint8), b.qweight.view(torch.uint8)), (c, L)
        if c == 5.0:
            assert not torch.equal(a.qweight, before)


@pytest.mark.parametrize("rows,cols,fmt", CASES)
def test_dequantize_equals_the_torch_mirror(monkeypatch, rows, cols, fmt):
    q = _layer(rows, cols, fmt, False)
    mirror = _torch(monkeypatch, q.dequantize)
    assert torch.equal(q.dequantize().view(torch.int32), mirror.view(torch.int32))


def test_perturb_f32_masked_chunks_equal_the_torch_mirror(monkeypatch):
    """The float kernel over a flat tensor longer than a chunk, with a mask that starts mid-byte per chunk."""
    g = torch.Generator().manual_seed(5)
    for n in (1, 2047, 2049, 10_007):
        w = torch.randn(n, generator=g)
        mask = pack_mask(torch.rand(n, generator=g) < 0.3)
        for m in (None, mask):
            a, b = w.clone(), w.clone()
            quzo.perturb_weight_(a, KEY, RKEY, 1e-2, 7, m)
            _torch(monkeypatch, lambda b=b, m=m: quzo.perturb_weight_(b, KEY, RKEY, 1e-2, 7, m))
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), n


def test_forward_uses_the_fused_weight_only_during_a_query():
    """The hook returns None without an active query (plain dequantization), the fused weight during one."""
    lin = torch.nn.Linear(40, 24, bias=False)
    q = QuantLinear.from_linear(lin, QuantFormat("int", 4, group_size=8))
    opt = quzo.QuZOOptimizer([("l", q)])
    x = torch.randn(3, 40)
    plain = q(x)
    assert torch.equal(plain, x @ q.dequantize().T)
    opt.apply_(9, 1e-3)
    w = quzo.perturbed_weight(q, tensor_key(9, 0), quzo.stream_key(9, 0, quzo.STREAM_A), opt._a,
                              opt.settings.levels)
    assert not torch.equal(w, q.dequantize())
    assert torch.equal(q(x), torch.nn.functional.linear(x, w))
    opt.update_([9], [0.0], 1e-3)
    assert torch.equal(q(x), plain)


def test_float_floor_division_of_the_level_kernel_is_exact():
    """quzo.c's level(): floor(sl / 510) as trunc(((float)(sl + 65280) + 0.5f) * (1.0f / 510.0f)) - 128, in IEEE
    float32 as the kernel computes it, over every sl = s * L it can see (|s| <= 510, L <= 127)."""
    sl = torch.arange(-510 * 127, 510 * 127 + 1, dtype=torch.int32)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(510.0, dtype=torch.float32)  # C: 1.0f / 510.0f
    v = ((sl + 65280).float() + 0.5) * inv
    assert torch.equal(v.to(torch.int32) - 128, torch.div(sl, 510, rounding_mode="floor"))


def test_layers_of_one_shape_share_the_hook_buffer_only_without_autograd():
    """Without autograd the hook reuses one buffer per shape across layers; the outputs are those of fresh
    weights. With autograd enabled every layer gets its own tensor (F.linear may keep it for backward)."""
    fmt = QuantFormat("int", 4, group_size=8)
    lins = [torch.nn.Linear(32, 32, bias=False) for _ in range(3)]
    layers = [QuantLinear.from_linear(lin, fmt) for lin in lins]
    net = torch.nn.Sequential(*layers)
    opt = quzo.QuZOOptimizer([(f"l{i}", m) for i, m in enumerate(layers)])
    opt.apply_(4, 2e-3)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expect = x
        for i, m in enumerate(layers):
            w = quzo.perturbed_weight(m, tensor_key(4, i), quzo.stream_key(4, i, quzo.STREAM_A), opt._a,
                                      opt.settings.levels)
            expect = torch.nn.functional.linear(expect, w)
    with torch.inference_mode():
        got = net(x)
    assert torch.equal(got, expect) and list(opt._scratch) == [(32, 32)]
    with torch.no_grad():
        assert len({m.weight_hook(m).data_ptr() for m in layers}) == 1
    opt._scratch.clear()
    with torch.enable_grad():
        ws = [m.weight_hook(m) for m in layers]
    assert len({w.data_ptr() for w in ws}) == 3 and not opt._scratch
