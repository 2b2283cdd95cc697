"""QuZO: zeroth-order training through low-bit forward passes (Zhou et al. 2025, papers.md section 4).

Per query, with u = z (the unit-variance draw of zolm.zo.rng) of every quantized weight tensor:
    u1 = Q_A(u), u2 = Q_B(u)          two stochastic roundings of the same draw to ``perturb_bits`` bits,
                                      with independent rounding noise A and B (the paper's estimator)
    L+- = L(W_q +- eps u1)            the forward pass sees the dequantized low-bit weights plus the
                                      perturbation; the codes themselves are never perturbed
    g = (L+ - L-) / (2 eps)
    q <- clamp(q - SR_C(lr g u2 / s))  the update, in code units of the fixed per-group scale s, rounded
                                      stochastically (noise C) so that E[update] = lr g u2 although it is
                                      usually far below one grid step
E[u1 u2^T | u] = u u^T, so the estimator is unbiased; reusing u1 for the update (``two_draws=False``, what the
public code does) adds the rounding variance to the diagonal. ``perturb_bits=0`` perturbs with u itself and
``update_rounding="nearest"`` rounds updates to nearest: together the naive quantized MeZO baseline, whose
updates mostly round to zero.

All draws are counter-based, keyed by (step seed, tensor index, stream), so the two loss evaluations of a
query see the same u1, replay needs no forward pass, and the C kernels (kernels/quzo.c) and the torch code
below give identical integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zolm.errors import ZolmError
from zolm.quant.linear import QuantLinear
from zolm.quant.primitives import code_table, fp8_round
from zolm.utils import native
from zolm.utils.compile import chunk_size, compiled, scalars
from zolm.zo.optimizer import ZOConfig, ZOOptimizer
from zolm.zo.rng import (
    M32,
    _hash,
    backend_for,
    chunks,
    derive_seed,
    hash_positions,
    positions,
    round_coef,
    tensor_key,
    unpack_mask,
)

S_MAX = 510  # |s| <= 510 for the ih4 draw
S_STD = math.sqrt(21845)
STREAM_A, STREAM_B, STREAM_C = 0xA, 0xB, 0xC  # perturbation rounding, update-direction rounding, grid rounding


@dataclass(frozen=True)
class QuZOSettings:
    """perturb_bits: bits of u1/u2 (0: unquantized u); two_draws: independent roundings for u1 and u2;
    update_rounding: "stochastic" (QuZO) or "nearest" (naive)."""

    perturb_bits: int = 4
    two_draws: bool = True
    update_rounding: str = "stochastic"

    def __post_init__(self) -> None:
        if not 0 <= self.perturb_bits <= 8:
            raise ZolmError(f"perturb_bits must be 0 (no quantization) or 1..8, got {self.perturb_bits}")
        if self.update_rounding not in ("stochastic", "nearest"):
            raise ZolmError(f"unknown update rounding {self.update_rounding!r}; valid: nearest, stochastic")

    @property
    def levels(self) -> int:
        """L = 2^(b-1) - 1 (0 when unquantized)."""
        return 2 ** (self.perturb_bits - 1) - 1 if self.perturb_bits > 1 else (1 if self.perturb_bits == 1 else 0)

    @property
    def unit(self) -> float:
        """What one level is worth in units of the unit-variance u: (510 / L) / std (1 / std if unquantized)."""
        return (S_MAX / self.levels if self.levels else 1.0) / S_STD


def _levels_of(j: torch.Tensor, k1, k2, r1, r2, L: int) -> torch.Tensor:
    """Integer levels at positions j (int64): SR(s * L / 510) with the rounding stream (r1, r2), or s if L == 0."""
    h = _hash(j, k1, k2)
    s = (h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24) - S_MAX
    if L <= 0:
        return s
    r = _hash(j, r1, r2) >> 8
    return torch.div(s * L * (1 << 24) + r * S_MAX, S_MAX << 24, rounding_mode="floor")


def levels(start: int, n: int, key: tuple[int, int], rkey: tuple[int, int], L: int, device) -> torch.Tensor:
    """Integer levels of u: SR(s * L / 510) with rounding stream ``rkey`` (int64), or s itself when L == 0."""
    j = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return _levels_of(j, key[0], key[1], rkey[0], rkey[1], L)


def stream_key(seed: int, index: int, stream: int) -> tuple[int, int]:
    """Key of rounding stream ``stream`` (STREAM_A/B/C) of tensor ``index`` under step ``seed``."""
    k = tensor_key(derive_seed(seed, stream), index)
    return k[0] & M32, k[1] & M32


def direction(seed: int, index: int, n: int, settings: QuZOSettings, stream: int = STREAM_A) -> torch.Tensor:
    """u1 (stream A) or u2 (stream B) of tensor ``index``, in units of the unit-variance u (float64)."""
    lv = levels(0, n, tensor_key(seed, index), stream_key(seed, index, stream), settings.levels, "cpu")
    return lv.double() * settings.unit


def _perturb_chunk(seg, start, k1, k2, r1, r2, a, L: int, keep):
    step = _levels_of(positions(start, seg.numel(), seg.device), k1, k2, r1, r2, L).to(torch.float32) * a
    if keep is not None:
        step = torch.where(keep, step, torch.zeros_like(step))
    return seg + step


def perturb_weight_(w: torch.Tensor, key, rkey, a: float, L: int, mask: torch.Tensor | None = None) -> None:
    """w += a * level (in place, float32 w) where the bit-packed ``mask`` is set: QuZO's virtual perturbation
    inside a QuantLinear forward (C kernel on the CPU, a compiled torch kernel on CUDA)."""
    flat = w.view(-1)
    if backend_for(w) == "c":
        native.lib().zolm_quzo_perturb_f32(flat.data_ptr(), flat.numel(), *key, *rkey, a, L,
                                            None if mask is None else mask.data_ptr(), native.threads(flat.numel()))
        return
    fn = compiled(_perturb_chunk, w.device)
    k1, k2, r1, r2, ca = scalars(w.device, *key, *rkey, floats=(a,))
    for part, keep, s0 in chunks(flat.numel(), w.device, mask):
        flat[part] = fn(flat[part], s0, k1, k2, r1, r2, ca, L, keep)


def perturbed_weight(module: QuantLinear, key, rkey, a: float, L: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantized weight of ``module`` plus a * level where its ``sparsity_mask`` is set (float32): dequantize
    then perturb_weight_, fused into one pass over the codes by a C kernel on the CPU (the same floats as the two
    passes, which run everywhere else). The C path writes into ``out`` (contiguous float32 [out, in]) when given,
    else into a new tensor; the others always return a new one."""
    lib = native.lib()
    q, scale, fmt, mask = module.qweight, module.scale, module.fmt, module.sparsity_mask
    if lib is not None and q.device.type == "cpu" and q.is_contiguous() and scale.is_contiguous() \
            and scale.dtype == torch.float32:
        rows, cols = module.out_features, module.in_features
        if out is None:
            out = torch.empty(rows, cols, dtype=torch.float32)
        # the kernel writes rows * cols floats at out's address
        assert out.shape == (rows, cols) and out.dtype == torch.float32 and out.is_contiguous() and out.is_cpu
        args = (rows, cols, fmt.group_size or cols, *key, *rkey, a, L, None if mask is None else mask.data_ptr(),
                native.threads(rows * cols))
        if fmt.kind == "int" and fmt.bits == 4:
            lib.zolm_quzo_dequant_perturb_int4(q.data_ptr(), scale.data_ptr(), out.data_ptr(), *args)
        else:
            lib.zolm_quzo_dequant_perturb_lut8(q.view(torch.uint8).data_ptr(), code_table(fmt).data_ptr(),
                                                scale.data_ptr(), out.data_ptr(), *args)
        return out
    w = module.dequantize()
    perturb_weight_(w, key, rkey, a, L, mask)
    return w


def _int_update_chunk(values, scale, start, cols: int, group: int, k1, k2, r1, r2, u1, u2, c, L: int, rtn: bool,
                      keep, qmin: int, qmax: int):
    """clamp(q - R(c * level / s)) of one chunk of integer code values (float32): zolm_quzo_update_int* in torch."""
    j = positions(start, values.numel(), values.device)
    sc = scale[(j // cols) * (cols // group) + (j % cols) // group]
    delta = (c * _levels_of(j, k1, k2, r1, r2, L).float()) / sc
    if rtn:
        d = torch.round(delta)
    else:
        d = torch.floor(delta + (_hash(j, u1, u2) >> 8).float() * (1.0 / 16777216.0))
    d = d.clamp(-256, 256)
    if keep is not None:
        d = torch.where(keep, d, torch.zeros_like(d))
    return (values - d).clamp(qmin, qmax)


def _deltas(module: QuantLinear, start: int, n: int, key, rkey, c: float, L: int) -> torch.Tensor:
    """Real code steps c * level / s of positions start .. start+n-1 (float32; FP8's update)."""
    cols = module.in_features
    j = torch.arange(start, start + n, device=module.scale.device)
    group = module.fmt.group_size or cols
    sc = module.scale.view(-1)[(j // cols) * (cols // group) + (j % cols) // group]
    return (torch.tensor(c, dtype=torch.float32) * levels(start, n, key, rkey, L, sc.device).float()) / sc


@torch.no_grad()
def update_codes_(module: QuantLinear, key, rkey, ukey, c: float, L: int, rtn: bool) -> None:
    """q <- clamp(q - R(c * level / s)) over the whole layer (INT8, packed INT4 or FP8 codes), except where the
    layer's ``sparsity_mask`` (the zeros of a pruned layer) is clear."""
    fmt, rows, cols = module.fmt, module.out_features, module.in_features
    group = fmt.group_size or cols
    q = module.qweight
    mask = module.sparsity_mask
    use_c = native.lib() is not None
    if fmt.kind == "int" and q.device.type == "cpu" and use_c and q.is_contiguous():
        args = (rows, cols, group, module.scale.data_ptr(), *key, *rkey, *ukey, c, L, int(rtn),
                None if mask is None else mask.data_ptr())
        if fmt.bits == 8:
            native.lib().zolm_quzo_update_int8(q.data_ptr(), *args, int(fmt.qmin), int(fmt.qmax),
                                                native.threads(rows * cols))
        else:
            native.lib().zolm_quzo_update_int4(q.data_ptr(), *args, native.threads(rows * cols))
        return
    from zolm.quant.primitives import codes_to_float, float_to_codes

    values = codes_to_float(q, fmt).view(-1)
    if fmt.kind == "int":
        fn = compiled(_int_update_chunk, q.device)
        keys = scalars(q.device, *key, *rkey, *ukey, floats=(c,))
        scale = module.scale.view(-1)
        for part, keep, s0 in chunks(values.numel(), q.device, mask):
            values[part] = fn(values[part], scale, s0, cols, group, *keys, L, rtn, keep, int(fmt.qmin), int(fmt.qmax))
    else:  # FP8: round the real target onto the FP8 grid
        step = chunk_size(q.device)
        for s in range(0, values.numel(), step):
            m = min(step, values.numel() - s)
            delta = _deltas(module, s, m, key, rkey, c, L)
            if mask is not None:
                delta = delta.masked_fill(~unpack_mask(mask, m, s), 0.0)
            target = (values[s:s + m] - delta).clamp(fmt.qmin, fmt.qmax)
            noise = None if rtn else (hash_positions(s, m, ukey, target.device) >> 8).float() * (1.0 / 16777216.0)
            values[s:s + m] = fp8_round(target, fmt.fp8, noise)
    q.copy_(float_to_codes(values.view(rows, cols), fmt))


class _CodeSet:
    """The ParamSet stand-in of QuZO: names and code tensors of the trained QuantLinear layers."""

    def __init__(self, modules: list[tuple[str, QuantLinear]]):
        if not modules:
            raise ZolmError("QuZO found no quantized linear layer to train")
        self.names = [f"{n}.qweight" for n, _ in modules]
        self.params = [m.qweight for _, m in modules]
        self.masks = [None] * len(modules)
        self._sizes = [m.out_features * m.in_features for _, m in modules]

    def __len__(self) -> int:
        return len(self.params)

    def numel(self) -> int:
        """Number of trained weights (codes), whatever their packing."""
        return sum(self._sizes)


class QuZOOptimizer(ZOOptimizer):
    """ZO over the codes of QuantLinear layers: virtual quantized perturbations, stochastically rounded updates."""

    method = "quzo"

    def __init__(self, modules: list[tuple[str, QuantLinear]], config: ZOConfig | None = None,
                 settings: QuZOSettings | None = None):
        config = config or ZOConfig()
        if config.sampler != "ih4":
            raise ZolmError("QuZO quantizes the ih4 draw; use sampler ih4")
        if config.weight_decay:
            raise ZolmError("weight decay is not defined on low-bit codes; use weight_decay 0 with QuZO")
        super().__init__(_CodeSet(modules), config)
        self.modules = [m for _, m in modules]
        self.settings = settings or QuZOSettings()
        self._seed: int | None = None
        self._coef = 0.0
        self._a = 0.0
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}  # the hook's perturbed weights, by shape
        for i, m in enumerate(self.modules):
            m.weight_hook = self._hook(i)

    def _hook(self, i: int):
        def hook(module: QuantLinear) -> torch.Tensor | None:
            if self._seed is None or self._a == 0.0:
                return None  # no query active: the plain dequantized weight
            scratch = None
            if not torch.is_grad_enabled() and module.qweight.device.type == "cpu":
                # no autograd graph keeps W past the layer's F.linear, so one buffer per shape serves every layer:
                # no fresh pages to fault in per layer and forward (~4% of a perturbed forward)
                shape = (module.out_features, module.in_features)
                scratch = self._scratch.get(shape)
                if scratch is None:
                    scratch = self._scratch[shape] = torch.empty(shape, dtype=torch.float32)
            return perturbed_weight(module, tensor_key(self._seed, i), stream_key(self._seed, i, STREAM_A),
                                    self._a, self.settings.levels, scratch)
        return hook

    def apply_(self, seed: int, coef: float) -> float:
        """Virtual: the next forward passes see W_q + (accumulated coef) * u1(seed); codes are untouched."""
        if self._seed != seed:
            self._seed, self._coef = seed, 0.0
        self._coef += coef
        self._a = round_coef(self._coef * self.settings.unit)
        return self._a / self.settings.unit

    def update_(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """q <- q - SR(lr g_q u2_q / s) for every query; the virtual perturbation is dropped."""
        self._seed, self._coef, self._a = None, 0.0, 0.0
        s, n = self.settings, len(seeds)
        for seed, g in zip(seeds, grads):
            c = round_coef(lr * g / n * s.unit)
            if c == 0.0:
                continue
            for i, m in enumerate(self.modules):
                rkey = stream_key(seed, i, STREAM_B if s.two_draws else STREAM_A)
                update_codes_(m, tensor_key(seed, i), rkey, stream_key(seed, i, STREAM_C), c, s.levels,
                              s.update_rounding == "nearest")

    def replay_(self, record: dict) -> None:
        """Perturbations never touch the codes, so replaying a step is its update alone."""
        self.update_(record["seeds"], record["grads"], record["lr"])

    def header(self) -> dict:
        return {**super().header(), "perturb_bits": self.settings.perturb_bits,
                "two_draws": self.settings.two_draws, "update_rounding": self.settings.update_rounding}
