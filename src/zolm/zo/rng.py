"""Counter-based perturbation generator: z is a pure function of (seed, parameter, position).

MeZO (Malladi et al. 2023, Algorithm 1) regenerates the perturbation z from a seed four times per step with
torch's sequential Mersenne-Twister normal generator. zolm instead derives every element of z from a hash:

    key  = splitmix64(seed, parameter index)                       -> two 32-bit words k1, k2
    h_j  = mix32(mix32(j ^ k1) ^ k2)                               j = flat position in the parameter
    z_j  = s_j / std,   s_j = sum of the four bytes of h_j - 510   ("ih4", default; std = sqrt(21845))
                        s_j = +-1 from the top bit of h_j          ("rademacher"; std = 1)

``ih4`` is the Irwin-Hall sum of four uniform bytes: symmetric, mean 0, variance exactly 1, kurtosis 2.7,
support |z| <= 3.45 -- a close stand-in for N(0, 1). SPSA's estimator (L(theta+eps z) - L(theta-eps z)) /
(2 eps) * z only needs E[z] = 0 and E[z z^T] = I to be unbiased to first order in eps (Spall 1992; the
classic SPSA uses Rademacher z, offered here too).

Why not torch.normal: it is sequential (one generator per call), regenerating 135M values costs ~0.5 s on
two cores, and its stream depends on how the tensor is chunked. The hash is a pure function of the position,
so it vectorises, parallelises over threads, can be chunked freely (no whole-tensor temporaries), and is
identical on every backend: the C kernel (kernels/zo_axpy.c, compiled with gcc and loaded with ctypes), the
torch implementation below and its torch.compile'd form on CUDA give the same bits. Exactness rests on one
rule: coefficients are rounded to 14 significant bits (:func:`round_coef`), so coef * s is exact in float32
and ``p + coef*s`` rounds once, FMA or not. A pass that restores and updates applies two such coefficients
(``(p + eps s) + lr g s``), never their sum: the small step keeps its own 14 bits.
"""

from __future__ import annotations

import math

import torch

from zolm.errors import unknown
from zolm.utils import native
from zolm.utils.compile import chunk_size, compiled, scalars
from zolm.utils.sparse import pack_mask, unpack_mask  # noqa: F401  (re-exported)

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
# name -> (id used by the C kernel, standard deviation of the integer draw s)
SAMPLERS: dict[str, tuple[int, float]] = {"ih4": (0, math.sqrt(4 * (256**2 - 1) / 12)), "rademacher": (1, 1.0)}
COEF_BITS = 14


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele et al. 2014) on Python ints: a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of integer parts (e.g. run seed, step, query)."""
    x = 0x5EED
    for p in parts:
        x = splitmix64(x ^ (int(p) & M64))
    return x & ((1 << 63) - 1)


def tensor_key(seed: int, index: int) -> tuple[int, int]:
    """The two 32-bit hash keys of parameter number ``index`` under perturbation ``seed``."""
    k = splitmix64(splitmix64(seed & M64) ^ ((index * 0xD1B54A32D192ED03) & M64))
    return k & M32, k >> 32


def round_coef(c: float, bits: int = COEF_BITS) -> float:
    """Round ``c`` to ``bits`` significant bits (a float32-exact value), so that c * s is exact."""
    if c == 0.0 or not math.isfinite(c):
        return c
    m, e = math.frexp(c)
    return math.ldexp(round(m * (1 << bits)), e - bits)


def sampler_std(sampler: str) -> float:
    if sampler not in SAMPLERS:
        raise unknown("sampler", sampler, SAMPLERS)
    return SAMPLERS[sampler][1]


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic on values < 2^32; both multipliers are < 2^31 so products stay below 2^63.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & M32
    return x ^ (x >> 16)


def _hash(j: torch.Tensor, k1, k2) -> torch.Tensor:
    """mix32(mix32(j ^ k1) ^ k2) of int64 positions j (keys: ints or 0-dim int64 tensors)."""
    return _mix32(_mix32((j & M32) ^ k1) ^ k2)


def hash_positions(start: int, n: int, key: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """h_j = mix32(mix32(j ^ k1) ^ k2) for j = start .. start+n-1, as int64 values in [0, 2^32)."""
    return _hash(torch.arange(start, start + n, dtype=torch.int64, device=device), key[0], key[1])


def s_of_hash(h: torch.Tensor, sampler_id: int) -> torch.Tensor:
    """The integer draw s (as float32) of hash values h: ih4 (sampler 0) or Rademacher (1)."""
    if sampler_id == 0:
        s = (h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24) - 510
    else:
        s = 1 - 2 * (h >> 31)
    return s.to(torch.float32)


def positions(start, n: int, device) -> torch.Tensor:
    """Flat positions start .. start+n-1 (int64); ``start`` an int or a 0-dim int64 tensor."""
    return torch.arange(n, dtype=torch.int64, device=device) + start


def _torch_draw(n: int, start: int, k1: int, k2: int, sampler_id: int, device: torch.device) -> torch.Tensor:
    return s_of_hash(hash_positions(start, n, (k1, k2), device), sampler_id)


def _axpy2_chunk(seg: torch.Tensor, start: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, a1: torch.Tensor,
                 a2: torch.Tensor, sampler_id: int, keep: torch.Tensor | None, two: bool) -> torch.Tensor:
    """(seg + a1 s) (+ a2 s if ``two``) over one chunk, computed in float32 (float64 tensors: in float64);
    where ``keep`` is False the values are returned unchanged. Keys and coefficients are 0-dim tensors, so
    torch.compile traces the function once, not once per step."""
    s = s_of_hash(_hash(positions(start, seg.numel(), seg.device), k1, k2), sampler_id)
    x = seg if seg.dtype == torch.float64 else seg.float()
    out = x + s * a1
    if two:
        out = out + s * a2
    if keep is not None:  # where(), not a multiply by the mask: p + 0.0 would turn -0.0 into +0.0
        out = torch.where(keep, out, x)
    return out.to(seg.dtype)


def chunks(n: int, device: torch.device, packed: torch.Tensor | None = None):
    """(start, slice, keep mask or None, start as a 0-dim tensor) of each chunk of a torch-fallback pass."""
    step = chunk_size(device)
    for s in range(0, n, step):
        m = min(step, n - s)
        yield slice(s, s + m), (None if packed is None else unpack_mask(packed, m, s)), scalars(device, s)[0]


def _lib():
    return native.lib()


def backend_for(p: torch.Tensor) -> str:
    """'c' for contiguous float32 CPU tensors when the C kernel builds, else 'torch'.

    ``ZOLM_KERNEL=torch`` forces the torch implementation (same bits, slower on CPU).
    """
    if p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() and _lib() is not None:
        return "c"
    return "torch"


def draw(n: int, key: tuple[int, int], sampler: str = "ih4", start: int = 0,
         device: torch.device | str = "cpu", backend: str | None = None) -> torch.Tensor:
    """The unit-variance draws z_start .. z_{start+n-1} of one parameter, as float32."""
    sid, std = SAMPLERS[sampler] if sampler in SAMPLERS else (None, None)
    if sid is None:
        raise unknown("sampler", sampler, SAMPLERS)
    if start + n > 1 << 32:
        raise ValueError("a parameter may hold at most 2^32 elements")
    device = torch.device(device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    use_c = (backend or ("c" if device.type == "cpu" else "torch")) == "c" and _lib() is not None
    if use_c:
        _lib().zolm_draw_f32(out.data_ptr(), n, start, key[0], key[1], sid, native.threads(n))
    else:
        step = chunk_size(device)
        for s in range(0, n, step):
            m = min(step, n - s)
            out[s:s + m] = _torch_draw(m, start + s, key[0], key[1], sid, device)
    return out.div_(std) if std != 1.0 else out


def check_mask(mask: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
    """A bool mask of p's shape, or p.numel()/8 bit-packed bytes, as contiguous packed uint8 on p's device."""
    if mask is None:
        return None
    n = p.numel()
    packed = (pack_mask(mask) if mask.dtype == torch.bool else mask).to(p.device).contiguous()
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"mask must be bool of shape {tuple(p.shape)} or {(n + 7) // 8} packed uint8 bytes")
    return packed


def axpy_z_(p: torch.Tensor, key: tuple[int, int], coef: float, sampler: str = "ih4",
            mask: torch.Tensor | None = None, then: float = 0.0) -> float:
    """In place ``p = (p + coef z) + then z`` (z of unit variance from ``key``), only where ``mask`` is set.

    Two coefficients, each rounded to 14 significant bits on its own (:func:`round_coef`) and applied as two
    exact products: ZO fuses the restore (+eps) with the update (-lr g) in one pass, and the update keeps its
    own precision however much smaller than eps it is (one coefficient ``eps - lr g`` would put lr g on eps's
    14-bit grid: 3e-8 became 6.9e-8 at eps 1e-3). ``mask`` is a bool tensor of p's shape or a bit-packed
    uint8 one (:func:`pack_mask`); masked-out coordinates keep their exact bits. Returns the first coefficient
    actually applied to the unit-variance z. Any dtype and device; float32 CPU tensors use the C kernel,
    CUDA tensors a compiled torch kernel, all with the same bits (half-precision tensors are computed in
    float32 and rounded to nearest once).
    """
    if sampler not in SAMPLERS:
        raise unknown("sampler", sampler, SAMPLERS)
    sid, std = SAMPLERS[sampler]
    a1, a2 = round_coef(coef / std), round_coef(then / std)
    if a1 == 0.0 and a2 == 0.0:
        return 0.0
    n = p.numel()
    if n > 1 << 32:
        raise ValueError("a parameter may hold at most 2^32 elements")
    flat = p.view(-1)
    packed = check_mask(mask, p)
    half = {torch.bfloat16: 0, torch.float16: 1}.get(p.dtype)
    if half is not None and p.device.type == "cpu" and p.is_contiguous() and _lib() is not None:
        _lib().zolm_axpy_half(flat.data_ptr(), n, 0, *(k & M32 for k in key), a1, a2, int(a2 != 0.0), sid,
                              None if packed is None else packed.data_ptr(), half, native.threads(n))
    elif backend_for(p) == "c":
        mptr = None if packed is None else packed.data_ptr()
        if a2 == 0.0:
            _lib().zolm_axpy_f32(flat.data_ptr(), n, 0, *(k & M32 for k in key), a1, sid, mptr,
                                 native.threads(n))
        else:
            _lib().zolm_axpy2_f32(flat.data_ptr(), n, 0, *(k & M32 for k in key), a1, a2, sid, mptr,
                                  native.threads(n))
    else:
        fn = compiled(_axpy2_chunk, p.device)
        k1, k2, ca1, ca2 = scalars(p.device, key[0] & M32, key[1] & M32, floats=(a1, a2))
        for part, keep, s0 in chunks(n, p.device, packed):
            flat[part] = fn(flat[part], s0, k1, k2, ca1, ca2, sid, keep, a2 != 0.0)
    return a1 * std
