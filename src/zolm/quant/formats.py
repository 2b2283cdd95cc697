"""Number formats and granularities: INT8 / INT4 (symmetric) and FP8 E4M3 / E5M2 (simulated on the CPU).

A weight row (one output channel) is split into groups of ``group_size`` consecutive input columns
(``None``: the whole row), each with its own float32 scale ``s``; the stored code ``q`` represents ``s * q``:
    INT b:  q in {-2^(b-1), ..., 2^(b-1) - 1},  s = max|w_group| / (2^(b-1) - 1)   (absmax, symmetric)
    FP8:    q an FP8 value (torch.float8_e4m3fn: max 448; torch.float8_e5m2: max 57344), s = max|w_group| / max
With ``fp16_scales`` the scale is rounded to the nearest float16 value *before* the codes are computed, so that
s * q is exactly what a GGUF Q4_0 / Q8_0 block (one fp16 scale per 32 codes, ggml-common.h ``block_q4_0`` /
``block_q8_0``) stores; it is on by default for INT4 and INT8 with groups of 32 (those layouts' block size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from zolm.errors import ZolmError

FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
INT_BITS = (4, 8)
CLIPS = ("mse", "act", "none")


@dataclass(frozen=True)
class QuantFormat:
    """One number format: ``kind`` "int" (bits 4 or 8) or "fp8" (``fp8`` = "e4m3" or "e5m2")."""

    kind: str = "int"
    bits: int = 8
    fp8: str = "e4m3"
    group_size: int | None = None
    fp16_scales: bool | None = None  # None: on for int with group_size 32 (GGUF Q4_0 / Q8_0 blocks), else off
    clip: str | None = None  # scale search: "mse" (clip each group's range to minimise its error), "act" (the
    # same search on the error weighted by calibration activations) or "none" (absmax); None: "mse" for int4,
    # "none" otherwise (zolm.quant.primitives.compute_scales)

    def __post_init__(self) -> None:
        if self.fp16_scales is None:
            object.__setattr__(self, "fp16_scales", self.kind == "int" and self.group_size == 32)
        if self.clip is None:
            object.__setattr__(self, "clip", "mse" if self.kind == "int" and self.bits == 4 else "none")
        if self.clip not in CLIPS:
            raise ZolmError(f"unknown clip {self.clip!r}; valid: {', '.join(CLIPS)}")
        if self.clip == "act" and self.kind != "int":
            raise ZolmError("clip act searches integer grids; fp8 takes clip none")
        if self.kind not in ("int", "fp8"):
            raise ZolmError(f"unknown number format {self.kind!r}; valid: int, fp8")
        if self.kind == "int" and self.bits not in INT_BITS:
            raise ZolmError(f"unsupported bit width {self.bits} for int; valid: 4, 8")
        if self.kind == "fp8" and self.bits != 8:
            raise ZolmError(f"fp8 is an 8-bit format; got bits={self.bits}")
        if self.fp8 not in FP8:
            raise ZolmError(f"unknown fp8 variant {self.fp8!r}; valid: e4m3, e5m2")
        if self.group_size is not None and self.group_size < 1:
            raise ZolmError(f"group_size must be a positive number of columns, got {self.group_size}")

    @property
    def qmax(self) -> float:
        """Largest representable magnitude of a code."""
        return float(2 ** (self.bits - 1) - 1) if self.kind == "int" else FP8[self.fp8][1]

    @property
    def qmin(self) -> float:
        return float(-(2 ** (self.bits - 1))) if self.kind == "int" else -FP8[self.fp8][1]

    @property
    def storage_dtype(self) -> torch.dtype:
        if self.kind == "fp8":
            return FP8[self.fp8][0]
        return torch.uint8 if self.bits == 4 else torch.int8

    @property
    def name(self) -> str:
        base = f"int{self.bits}" if self.kind == "int" else f"fp8-{self.fp8}"
        return base + (f"-g{self.group_size}" if self.group_size else "")


@dataclass(frozen=True)
class QuantConfig:
    """Which layers get which format.

    Args:
        weight: the format of the linear layers inside the decoder blocks.
        embed_bits: INT bits of the token embedding (shared with a tied LM head), per row; None keeps it float.
        embed_fp16_scales: round the embedding's row scales to float16 (default: as the linear layers).
        act_bits: fake-quantize the input of every quantized linear layer per tensor (INT, round to nearest);
            None leaves activations in float.
        skip: substrings of module names never quantized (the LM head is never quantized unless tied).
    """

    weight: QuantFormat = QuantFormat()
    embed_bits: int | None = 8
    act_bits: int | None = None
    skip: tuple[str, ...] = ("lm_head",)
    embed_fp16_scales: bool | None = None  # None: the same as ``weight.fp16_scales``

    def __post_init__(self) -> None:
        if self.embed_fp16_scales is None:
            object.__setattr__(self, "embed_fp16_scales", bool(self.weight.fp16_scales))
        if self.embed_bits is not None and self.embed_bits not in INT_BITS:
            raise ZolmError(f"unsupported bit width {self.embed_bits} for embeddings; valid: 4, 8")
        if self.act_bits is not None and self.act_bits not in INT_BITS:
            raise ZolmError(f"unsupported bit width {self.act_bits} for activations; valid: 4, 8")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        d = dict(d)
        d["weight"] = QuantFormat(**d.get("weight", {}))
        d["skip"] = tuple(d.get("skip", ("lm_head",)))
        return cls(**d)
