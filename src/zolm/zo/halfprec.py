"""ZO passes over half-precision (bfloat16 / float16) weights: perturbed copies, master-weight steps and
stochastically rounded steps, each one pass with a counter-based z (zolm.zo.rng) and the same bits on every
backend (C kernel kernels/zo_half.c on the CPU, torch elsewhere, compiled on CUDA).

    perturb_half_(dst, src, key, a)        dst = half(src + a z)            src: float32 master or half weights
    master_step_(m, dst, key, c, mult)     m = m mult + c z;  dst = half(m)   (exact mode's update)
    sr_step_(w, key, rkey, c, mult)        w = SR(w mult + c z)               (lean mode's update)

half() rounds to nearest even (torch's conversion). SR rounds x to one of its two neighbouring half values
lo <= x <= hi, up iff u < (x - lo) / (hi - lo) with u = 24 bits of the hash stream ``rkey`` / 2^24, so
E[SR(x)] = x up to 2^-24 of a grid step: an update far below half an ulp survives in expectation instead of
rounding away. x itself is computed in float32 (w mult + c z rounds once there, ~2^-16 of a half ulp).
"""

from __future__ import annotations

import torch

from zolm.utils import native
from zolm.utils.compile import compiled, scalars
from zolm.zo.rng import M32, SAMPLERS, _hash, check_mask, chunks, positions, round_coef, s_of_hash

HALF_DTYPES = {torch.bfloat16: 0, torch.float16: 1}


def _c_ok(*tensors: torch.Tensor) -> bool:
    return native.lib() is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _s(start, n, k1, k2, sid, device) -> torch.Tensor:
    return s_of_hash(_hash(positions(start, n, device), k1, k2), sid)


def _perturb_chunk(src, start, k1, k2, a, sid: int, keep, dtype: torch.dtype):
    x = src.float()
    y = x + _s(start, src.numel(), k1, k2, sid, src.device) * a
    if keep is not None:
        y = torch.where(keep, y, x)
    return y.to(dtype)


def _master_chunk(m, start, k1, k2, c, mult, sid: int, keep):
    y = m * mult
    y = y + _s(start, m.numel(), k1, k2, sid, m.device) * c
    return y if keep is None else torch.where(keep, y, m)


def _half_bits(h: torch.Tensor) -> torch.Tensor:
    return h.view(torch.int16).to(torch.int32) & 0xFFFF


def _from_bits(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((b ^ 0x8000) - 0x8000).to(torch.int16).view(dtype)


def sr_round(x: torch.Tensor, r24: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stochastic rounding of float32 ``x`` to ``dtype`` with uniform integers r24 in [0, 2^24)."""
    near = x.to(dtype)
    nf = near.float()
    bits = _half_bits(near)
    up = x > nf
    neg = (bits & 0x8000) != 0
    mag = bits & 0x7FFF
    other_bits = torch.where(mag == 0, torch.where(up, 0x0001, 0x8001),
                             torch.where(up != neg, bits + 1, bits - 1))
    other = _from_bits(other_bits, dtype)
    of = other.float()
    lo, hi = torch.minimum(nf, of), torch.maximum(nf, of)
    p_up = (x - lo) / (hi - lo)
    pick_hi = r24.float() * (1.0 / 16777216.0) < p_up
    low_h = torch.where(nf < of, near, other)
    high_h = torch.where(nf < of, other, near)
    out = torch.where(pick_hi, high_h, low_h)
    stay = (nf == x) | torch.isnan(x) | ~torch.isfinite(nf) | ~torch.isfinite(of)
    return torch.where(stay, near, out)


def _sr_chunk(w, start, k1, k2, c, mult, sid: int, r1, r2, keep):
    x = w.float() * mult
    j = positions(start, w.numel(), w.device)
    x = x + s_of_hash(_hash(j, k1, k2), sid) * c
    y = sr_round(x, _hash(j, r1, r2) >> 8, w.dtype)
    return y if keep is None else torch.where(keep, y, w)


def _coef(coef: float, sampler: str) -> tuple[int, float]:
    sid, std = SAMPLERS[sampler]
    return sid, round_coef(coef / std)


@torch.no_grad()
def perturb_half_(dst: torch.Tensor, src: torch.Tensor, key: tuple[int, int], coef: float, sampler: str = "ih4",
                  mask: torch.Tensor | None = None) -> float:
    """dst = half(src + coef z) (dst half, src float32 or dst's dtype); returns the applied coefficient."""
    sid, a = _coef(coef, sampler)
    packed = check_mask(mask, dst)
    n, dflat, sflat = dst.numel(), dst.view(-1), src.view(-1)
    if _c_ok(dst, src):
        native.lib().zolm_perturb_half(dflat.data_ptr(), sflat.data_ptr(), int(src.dtype == dst.dtype), n, 0,
                                       key[0] & M32, key[1] & M32, a, sid,
                                       None if packed is None else packed.data_ptr(), HALF_DTYPES[dst.dtype],
                                       native.threads(n))
    else:
        fn = compiled(_perturb_chunk, dst.device)
        k1, k2, ca = scalars(dst.device, key[0] & M32, key[1] & M32, floats=(a,))
        for part, keep, s0 in chunks(n, dst.device, packed):
            dflat[part] = fn(sflat[part], s0, k1, k2, ca, sid, keep, dst.dtype)
    return a * SAMPLERS[sampler][1]


@torch.no_grad()
def master_step_(master: torch.Tensor, dst: torch.Tensor | None, key: tuple[int, int], coef: float,
                 sampler: str = "ih4", mask: torch.Tensor | None = None, mult: float = 1.0) -> None:
    """master = master * mult + coef z (float32, where ``mask`` is set); then dst = half(master) if given."""
    sid, c = _coef(coef, sampler)
    packed = check_mask(mask, master)
    n, mflat = master.numel(), master.view(-1)
    dflat = None if dst is None else dst.view(-1)
    if _c_ok(master, *([] if dst is None else [dst])):
        native.lib().zolm_master_step(mflat.data_ptr(), None if dst is None else dflat.data_ptr(), n, 0,
                                      key[0] & M32, key[1] & M32, c, mult, sid,
                                      None if packed is None else packed.data_ptr(),
                                      HALF_DTYPES.get(None if dst is None else dst.dtype, 0), native.threads(n))
        return
    fn = compiled(_master_chunk, master.device)
    k1, k2, cc, cm = scalars(master.device, key[0] & M32, key[1] & M32, floats=(c, mult))
    for part, keep, s0 in chunks(n, master.device, packed):
        mflat[part] = fn(mflat[part], s0, k1, k2, cc, cm, sid, keep)
        if dflat is not None:
            dflat[part] = mflat[part].to(dst.dtype)


@torch.no_grad()
def sr_step_(w: torch.Tensor, key: tuple[int, int], rkey: tuple[int, int], coef: float, sampler: str = "ih4",
             mask: torch.Tensor | None = None, mult: float = 1.0) -> None:
    """w = SR(w * mult + coef z) in place (half w), rounding noise from the hash stream ``rkey``."""
    sid, c = _coef(coef, sampler)
    if c == 0.0 and mult == 1.0:
        return
    packed = check_mask(mask, w)
    n, flat = w.numel(), w.view(-1)
    if _c_ok(w):
        native.lib().zolm_sr_step_half(flat.data_ptr(), n, 0, key[0] & M32, key[1] & M32, c, mult, sid,
                                       rkey[0] & M32, rkey[1] & M32, None if packed is None else packed.data_ptr(),
                                       HALF_DTYPES[w.dtype], native.threads(n))
        return
    fn = compiled(_sr_chunk, w.device)
    k1, k2, r1, r2, cc, cm = scalars(w.device, key[0] & M32, key[1] & M32, rkey[0] & M32, rkey[1] & M32,
                                     floats=(c, mult))
    for part, keep, s0 in chunks(n, w.device, packed):
        flat[part] = fn(flat[part], s0, k1, k2, cc, cm, sid, r1, r2, keep)
