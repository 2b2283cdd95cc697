"""zolm's INT codes and scales as GGUF blocks, bit for bit (no second rounding).

ggml's block formats (ggml-common.h; gguf-py ``gguf/quants.py`` reads them the same way), 32 consecutive
elements of a row per block:

    Q8_0  34 bytes: d (fp16) | qs[32] int8                        x[i] = d * qs[i]
    Q4_0  18 bytes: d (fp16) | qs[16] uint8                       x[i] = d * ((qs[i] & 0xF) - 8),
                                                                  x[i + 16] = d * ((qs[i] >> 4) - 8),  i < 16

so the low nibbles hold elements 0..15 of a block and the high nibbles 16..31 (zolm's own INT4 packing pairs
neighbouring columns instead). A zolm layer maps exactly when its scales are float16 values and each of its
groups (or its whole row, per channel) is a multiple of 32 columns: the group's scale is repeated in each of its
blocks, and the codes are copied (INT4 -> Q4_0 or Q8_0, INT8 -> Q8_0). ggml computes d * q in float32, as
zolm does, so the dequantized tensors are identical.
"""

from __future__ import annotations

import numpy as np
import torch

from zolm.errors import ZolmError
from zolm.quant.formats import QuantFormat
from zolm.quant.primitives import codes_to_float

BLOCK = 32
EXACT_TYPES = ("q4_0", "q8_0")


def fits(fmt: QuantFormat, cols: int, ggml_type: str) -> str | None:
    """Why a layer in ``fmt`` with ``cols`` input columns cannot be copied into ``ggml_type`` blocks (None: it can).

    Only the layout is checked here; :func:`check_scales` checks the values.
    """
    if fmt.kind != "int":
        return f"{fmt.name} is not an INT format"
    if ggml_type == "q4_0" and fmt.bits != 4:
        return f"{fmt.name} codes do not fit Q4_0's 4 bits"
    group = fmt.group_size or cols
    if group % BLOCK or cols % BLOCK:
        return f"{fmt.name} groups of {group} columns are not made of {BLOCK}-column blocks"
    return None


def check_scales(scale: torch.Tensor) -> str | None:
    """None if every scale is a finite float16 value (what a block's ``d`` can hold exactly), else the reason."""
    s = scale.detach().float().cpu()
    if not torch.isfinite(s).all() or not torch.equal(s.half().float(), s):
        return "its scales are float32 values that float16 cannot hold exactly"
    return None


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, ggml_type: str) -> np.ndarray:
    """GGUF block bytes [rows, cols / 32 * bytes_per_block] (uint8) of a zolm layer's codes and scales.

    Raises ZolmError when the layer does not map exactly (see :func:`fits` and :func:`check_scales`).
    """
    q = codes_to_float(codes.detach().cpu(), fmt).to(torch.int8)  # [rows, cols], -8..7 or -128..127
    rows, cols = q.shape
    why = fits(fmt, cols, ggml_type) or check_scales(scale)
    if why:
        raise ZolmError(f"cannot copy into {ggml_type.upper()} exactly: {why}")
    per_block = (fmt.group_size or cols) // BLOCK
    d = scale.detach().float().cpu().repeat_interleave(per_block, dim=1).half().numpy()  # [rows, cols / 32]
    d = d.reshape(rows, cols // BLOCK, 1).view(np.uint8)  # [rows, blocks, 2]
    qb = q.numpy().reshape(rows, cols // BLOCK, BLOCK)
    if ggml_type == "q8_0":
        body = qb.view(np.uint8)
    elif ggml_type == "q4_0":
        u = (qb.astype(np.int16) + 8).astype(np.uint8)  # 0..15
        body = u[..., :BLOCK // 2] | (u[..., BLOCK // 2:] << np.uint8(4))
    else:
        raise ZolmError(f"no exact block encoding for {ggml_type!r}; valid: {', '.join(EXACT_TYPES)}")
    return np.ascontiguousarray(np.concatenate([d, body], axis=-1).reshape(rows, -1))


def permute_rows(codes: torch.Tensor, scale: torch.Tensor, order: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder output rows (llama.cpp's Q/K rotary permutation) of codes and their scales together."""
    idx = torch.from_numpy(np.ascontiguousarray(order))
    return codes[idx], scale[idx]
