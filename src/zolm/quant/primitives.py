"""Pure quantization primitives: scales, rounding (nearest / stochastic), INT4 packing, FP8 grids.

Stochastic rounding (SR) of a real x onto a grid with neighbours lo <= x <= hi rounds up with probability
(x - lo) / (hi - lo), so E[SR(x)] = x (unbiased) whenever no clamping happens. Given a uniform noise u in
[0, 1), SR on the integer grid is floor(x + u). The noise is an argument: callers pass a counter-based stream
(zolm.zo.rng) when the draw must be reproducible, or torch.rand for a one-off quantization.
"""

from __future__ import annotations

import torch

from zolm.errors import ZolmError
from zolm.quant.formats import FP8, QuantFormat
from zolm.utils import native
from zolm.utils.compile import compiled


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, groups, group] (a view); groups of consecutive input columns."""
    out, cols = w.shape
    g = group_size or cols
    if cols % g:
        raise ZolmError(f"group_size {g} does not divide the {cols} input columns of a layer; "
                        f"use a divisor of {cols} or per-channel scales")
    return w.reshape(out, cols // g, g)


CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # clipped range / absmax tried by clip "mse": 1 .. 0.5


def _scales(amax: torch.Tensor, fmt: QuantFormat, ratio: float = 1.0) -> torch.Tensor:
    scale = amax * ratio / fmt.qmax
    if fmt.fp16_scales:
        scale = scale.clamp(max=torch.finfo(torch.float16).max).half().float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def compute_scales(w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Scales [out, groups] (float32); all-zero groups get scale 1 so codes stay 0.

    ``fmt.clip == "none"``: absmax, s = max|w| / qmax. ``"mse"`` (INT only; the default for INT4): per group, the
    clipping ratio r in CLIP_RATIOS whose scale r max|w| / qmax minimises sum (w - s clamp(round(w / s)))^2 (the
    grid search of AWQ / llama.cpp's quantizers on the weight error; r = 1 is absmax, kept on ties). ``"act"``:
    the same search on sum_j h_j (w_j - q_j)^2 with ``importance`` h_j = mean x_j^2, the input's mean square on
    calibration data ([in]; zolm.quant.calibrate.input_importance): the diagonal of the layer's output error
    E||x (w - q)||^2, llama.cpp's importance-matrix ("imatrix") weighting. With ``fmt.fp16_scales`` each scale
    is rounded to float16 (kept in float32) before its codes: GGUF's block scale.
    """
    g = group_view(w.detach().float(), fmt.group_size)
    amax = g.abs().amax(-1)
    best = _scales(amax, fmt)
    if fmt.kind != "int" or fmt.clip not in ("mse", "act"):
        return best
    weight = None
    if fmt.clip == "act":
        if importance is None:
            raise ZolmError("clip act weighs rounding errors by calibration activations: quantize with "
                            "`zolm quantize --clip act` (or a recipe's quantize stage with clip: act) and use the "
                            "saved model")
        if importance.shape != (w.shape[1],):
            raise ZolmError(f"importance has shape {tuple(importance.shape)}; the layer has {w.shape[1]} inputs")
        weight = group_view(importance.detach().float().to(g.device).view(1, -1), fmt.group_size)

    def err(s: torch.Tensor) -> torch.Tensor:
        e = ((g / s.unsqueeze(-1)).round().clamp(fmt.qmin, fmt.qmax) * s.unsqueeze(-1) - g).pow(2)
        return (e if weight is None else e * weight).sum(-1)
    best_err = err(best)
    for r in CLIP_RATIOS[1:]:
        s = _scales(amax, fmt, r)
        e = err(s)
        better = e < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, e, best_err)
    return best


def round_stochastic(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """floor(x + u), u ~ U[0, 1): rounds up with probability frac(x); E[result] = x."""
    return torch.floor(x + noise)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes [out, in] (even in) -> uint8 [out, in/2]; low nibble = even column."""
    if q.shape[-1] % 2:
        raise ZolmError(f"INT4 packing needs an even number of columns, got {q.shape[-1]}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> signed codes int8 [out, in] in -8..7."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    q = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return (q ^ 8) - 8  # sign-extend the nibble


def codes_to_float(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Stored codes -> their real values before scaling (float32, [out, in])."""
    if fmt.kind == "int" and fmt.bits == 4:
        return unpack_int4(codes).float()
    return codes.float()


def float_to_codes(values: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Grid values (already rounded, float) -> stored codes."""
    if fmt.kind == "fp8":
        return values.to(FP8[fmt.fp8][0])
    q = values.clamp(fmt.qmin, fmt.qmax).to(torch.int8)
    return pack_int4(q) if fmt.bits == 4 else q


def quantize(w: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, noise: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Stored codes of ``w`` [out, in] under ``scale`` [out, groups]: round to nearest, or SR with ``noise``."""
    x = _unscaled(w, scale, fmt)
    if fmt.kind == "fp8":
        x = x.clamp(fmt.qmin, fmt.qmax)
        return float_to_codes(fp8_round(x, fmt.fp8, noise), fmt)
    x = x.round() if noise is None else round_stochastic(x, noise)
    return float_to_codes(x, fmt)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Q(w) = s * clamp(round(w / s)) as float32 [out, in]: ``dequantize(quantize(w, scale, fmt), scale, fmt)``
    bit for bit, without making the stored codes (INT: one division, rounding, clamping and product per
    weight, a native kernel on the CPU; FP8 takes the codes' path). The forward of a fake-quantized weight (STE,
    QuZO's float masters)."""
    if fmt.kind == "fp8":
        return dequantize(quantize(w, scale, fmt), scale, fmt)
    lib = native.lib()
    if (lib is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
            and w.dim() == 2 and scale.numel() == group_view(w, fmt.group_size).shape[1] * w.shape[0]):
        rows, cols = w.shape
        s = scale.float().contiguous()  # fp16 scales: exact in float32, as the torch expression promotes them
        out = torch.empty_like(w)
        lib.zolm_fake_quant_f32(w.data_ptr(), s.data_ptr(), out.data_ptr(), rows, cols, fmt.group_size or cols,
                                fmt.qmin, fmt.qmax, native.threads(rows * cols))
        return out
    return _rescaled(_unscaled(w, scale, fmt).round_().clamp_(fmt.qmin, fmt.qmax), scale, fmt)


def _unscaled(w: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """w / s per group, float32 [out, in] (a new tensor)."""
    return (group_view(w.float(), fmt.group_size) / scale.unsqueeze(-1)).reshape(w.shape)


def _rescaled(q: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """s * q per group, float32 [out, in]: grid values back to weights, in place (every caller passes a tensor it
    just made: no second weight-size temporary)."""
    return group_view(q, fmt.group_size).mul_(scale.unsqueeze(-1)).reshape(q.shape)


_LUTS: dict[str, torch.Tensor] = {}


def code_table(fmt: QuantFormat) -> torch.Tensor:
    """The real value of each of the 256 byte patterns of an 8-bit format (torch's own conversion)."""
    key = fmt.name.split("-g")[0]
    if key not in _LUTS:
        b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        dtype = torch.int8 if fmt.kind == "int" else FP8[fmt.fp8][0]
        _LUTS[key] = b.view(dtype).float().contiguous()
    return _LUTS[key]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """W = s * q, float32 [out, in] (a native kernel on the CPU; the same bits as the torch expression)."""
    lib = native.lib()
    if lib is not None and codes.device.type == "cpu" and codes.is_contiguous() and scale.is_contiguous():
        rows = codes.shape[0]
        packed = fmt.kind == "int" and fmt.bits == 4
        cols = codes.shape[1] * (2 if packed else 1)
        group = fmt.group_size or cols
        out = torch.empty(rows, cols, dtype=torch.float32)
        if packed:
            lib.zolm_dequant_int4(codes.data_ptr(), scale.data_ptr(), out.data_ptr(), rows, cols, group,
                                  native.threads(rows * cols))
        else:
            lib.zolm_dequant_lut8(codes.view(torch.uint8).data_ptr(), code_table(fmt).data_ptr(), scale.data_ptr(),
                                  out.data_ptr(), rows, cols, group, native.threads(rows * cols))
        return out
    return compiled(_dequantize_torch, codes.device)(codes, scale, fmt)


def _dequantize_torch(codes: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """s * q in torch (one fused kernel per layer when compiled on CUDA: unpack, convert and scale)."""
    return _rescaled(codes_to_float(codes, fmt), scale, fmt)


def _fp8_step(bits: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The FP8 bit pattern one grid step up (``up``) or down from ``bits`` (sign-magnitude encoding)."""
    sign = bits & 0x80
    mag = (bits & 0x7F).to(torch.int16)
    away = up ^ sign.bool()  # moving away from zero increments the magnitude
    mag = torch.where(away, mag + 1, mag - 1)
    cross = mag < 0  # stepping towards zero from +-0: continue on the other side
    mag = torch.where(cross, torch.ones_like(mag), mag)
    sign = torch.where(cross, sign ^ 0x80, sign)
    return (sign | mag.to(torch.uint8))


def fp8_round(x: torch.Tensor, variant: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round float32 ``x`` (within range) onto the FP8 grid: to nearest, or stochastically with ``noise``."""
    dtype = FP8[variant][0]
    near = x.to(dtype)
    if noise is None:
        return near.float()
    nf = near.float()
    bits = near.view(torch.uint8)
    other = _fp8_step(bits, x > nf).view(dtype).float()  # the neighbour on x's other side
    lo = torch.minimum(nf, other)
    hi = torch.maximum(nf, other)
    width = hi - lo
    p_up = torch.where(width > 0, (x - lo) / torch.where(width > 0, width, torch.ones_like(width)),
                       torch.zeros_like(x))
    out = torch.where(noise < p_up, hi, lo)
    return torch.where(nf == x, nf, out)
