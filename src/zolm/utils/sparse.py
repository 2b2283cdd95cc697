"""Bit-packed masks and the rule that tells a pruned weight tensor from a dense one (layer 0).

A mask is packed 8 coordinates per byte: coordinate i is bit (i & 7) of byte (i >> 3) (numpy's
``packbits(bitorder="little")``), so it costs 1/32 of the float32 tensor it covers. The C kernels read the same
layout.
"""

from __future__ import annotations

import torch

PRUNED_THRESHOLD = 0.1  # a 2-D weight with at least this share of exact zeros is treated as pruned


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> uint8 bit-packed (bit i & 7 of byte i >> 3), flattened: 1 bit per coordinate."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.uint8, device=flat.device))
    return (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Coordinates start .. start+n-1 of a bit-packed mask, as bool (start must be a multiple of 8)."""
    assert start % 8 == 0
    chunk = packed[start // 8:(start + n + 7) // 8]
    bits = (chunk.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[:n].bool()


def pruned_mask(weight: torch.Tensor, threshold: float = PRUNED_THRESHOLD) -> torch.Tensor | None:
    """``weight != 0`` if ``weight`` looks pruned (2-D, at least ``threshold`` exact zeros), else None.

    An all-zero tensor is a zero initialisation (LoRA's B), not a pruning result: None.
    """
    if weight.dim() != 2 or not weight.is_floating_point() or weight.device.type == "meta":
        return None
    nz = weight.detach() != 0
    density = nz.float().mean().item()
    return nz if 0.0 < density <= 1.0 - threshold else None
