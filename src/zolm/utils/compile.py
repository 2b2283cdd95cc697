"""Elementwise torch kernels on accelerators: one compiled kernel instead of ~40 small ones, in large chunks.

zolm's counter-based draws (zolm.zo.rng, zolm.zo.halfprec, zolm.zo.quzo) have a C kernel for the CPU and a torch
implementation for everything else. On CUDA the torch implementation runs in chunks of 16M elements, each chunk
function compiled by ``torch.compile`` (inductor fuses the hash, draw and update into one kernel); its keys and
coefficients are passed as 0-dim tensors so a new step does not recompile. Integer arithmetic is exact and every
float product the kernels form is exact, so compiled and eager code give the same bits (FMA or not).
``ZOLM_COMPILE=0`` keeps the eager functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
CPU_CHUNK = 1 << 16  # cache-sized temporaries on the CPU
GPU_CHUNK = 1 << 24  # few launches on accelerators (temporaries ~40 bytes per element: ~670 MB at 16M)
_COMPILED: dict[Callable, Callable] = {}
# inductor skips an intermediate cast to a lower precision unless told to emulate it; stochastic rounding
# compares x with half(x), which must really be rounded
OPTIONS = {"emulate_precision_casts": True}


def chunk_size(device: torch.device) -> int:
    """Elements per chunk of a torch-fallback pass on ``device``."""
    return CPU_CHUNK if device.type == "cpu" else GPU_CHUNK


def compiled(fn: Callable, device: torch.device) -> Callable:
    """``fn`` compiled with torch.compile (dynamic shapes) for CUDA devices, else ``fn`` itself.

    If compilation is unavailable (no Triton, ``ZOLM_COMPILE=0``) the eager function is used, with one warning
    for a failure; it gives the same bits, more slowly.
    """
    if device.type != "cuda" or os.environ.get("ZOLM_COMPILE", "1") == "0":
        return fn
    if fn not in _COMPILED:
        try:
            _COMPILED[fn] = torch.compile(fn, dynamic=True, options=OPTIONS)
        except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
            log.warning("zolm: torch.compile unavailable (%s); using eager kernels", e)
            _COMPILED[fn] = fn
    return _COMPILED[fn]


def force_compiled(fn: Callable) -> Callable:
    """``fn`` compiled whatever the device (tests use it to check compiled == eager on the CPU)."""
    return torch.compile(fn, dynamic=True, options=OPTIONS)


def scalars(device: torch.device, *ints: int, floats: tuple[float, ...] = ()) -> list[torch.Tensor]:
    """0-dim tensors for integer keys (int64) and float coefficients (float32) of a chunk function."""
    return ([torch.tensor(int(i), dtype=torch.int64, device=device) for i in ints]
            + [torch.tensor(float(f), dtype=torch.float32, device=device) for f in floats])
