"""MaZO's multi-task weight-update mask, its baselines, overlap statistics, and saving / loading.

Aggregation and selection (MaZO structure, papers.md 5.2 [SEC]; the per-task scores come from
:mod:`zolm.masks.importance`):

    S      = sum_t S_hat^t                          row-normalised task scores, summed over tasks
    M[i,j] = 1  iff  S[i, j] is among the k largest entries of row i,   k = round(rho * d_in)

Every row of every masked weight keeps exactly k coordinates; ties are broken towards the lower column index
(a stable sort), so a mask is a pure function of its scores. Baselines of the same ratio and layout:
``random`` (k uniformly random coordinates per row, seeded) and ``magnitude`` (the k largest |W| per row, i.e.
MaZO's beta term alone). Masks are saved bit-packed (1 bit per coordinate) in safetensors, with a JSON file
saying how they were made.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from zolm.errors import ZolmError, unknown
from zolm.utils.io import atomic_write_bytes, atomic_write_json
from zolm.zo.rng import pack_mask, unpack_mask

MASK_KINDS = ("importance", "random", "magnitude")
MASK_FILE = "masks.safetensors"
META_FILE = "masks.json"


def check_ratio(ratio: float) -> float:
    """The mask ratio rho must lie in (0, 1]."""
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and 0 < ratio <= 1):
        raise ZolmError(f"mask_ratio must be in (0, 1], got {ratio}")
    return float(ratio)


def row_k(d_in: int, ratio: float) -> int:
    """k = round(rho * d_in): how many coordinates of each row of length ``d_in`` are updated."""
    k = int(round(check_ratio(ratio) * d_in))
    if k < 1:
        raise ZolmError(f"mask_ratio {ratio} keeps no weight of rows of length {d_in}; "
                        f"use a ratio >= {0.5 / d_in:.3g}")
    return k


def topk_row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool ``[out, in]`` mask with exactly k = round(ratio * in) True entries per row: the row's largest scores.

    Ties go to the lower column index (stable descending sort), so equal inputs give equal masks everywhere.
    """
    if score.dim() != 2:
        raise ZolmError(f"a mask needs a 2-D [out, in] score, got shape {tuple(score.shape)}")
    if not torch.isfinite(score).all():
        raise ZolmError("importance scores contain NaN or infinity; check the calibration loss")
    k = row_k(score.shape[1], ratio)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]  # [out, k]
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    return mask.scatter_(-1, order, True)


def random_mask(shape: tuple[int, int], ratio: float, seed: int) -> torch.Tensor:
    """k uniformly random coordinates per row (the random-mask MeZO baseline), from a seeded CPU generator."""
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    return topk_row_mask(torch.rand(tuple(shape), generator=g), ratio)


def magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """The k largest |W| of each row (MaZO's magnitude term alone: alpha = 0, beta = 1, no gradient terms)."""
    return topk_row_mask(weight.detach().float().abs(), ratio)


def check_rows(masks: dict[str, torch.Tensor], ratio: float) -> None:
    """Raise ZolmError unless every row of every mask has exactly round(ratio * d_in) True entries."""
    for name, m in masks.items():
        k = row_k(m.shape[1], ratio)
        counts = m.sum(-1)
        if not bool((counts == k).all()):
            raise ZolmError(f"mask {name} has rows with {int(counts.min())}..{int(counts.max())} entries, not {k}")


def overlap_stats(task_masks: dict[str, dict[str, torch.Tensor]], final: dict[str, torch.Tensor],
                  ratio: float) -> dict:
    """How much the tasks' own top-k masks (each task's S_hat^t alone, same rho) agree with each other and with M.

    Returns ``pairwise`` (|M_a & M_b| / |M_a| for each pair: 1 = identical, ``ratio`` = what independent random
    masks share), ``in_final`` (|M_t & M| / |M|), ``final_votes`` (share of M's coordinates chosen by exactly c
    tasks, c = 0..T) and ``chance`` (= ratio). Masks may be bool or bit-packed (then unpacked per tensor).
    """
    tasks = list(task_masks)
    pair = {(a, b): 0 for a, b in itertools.combinations(tasks, 2)}
    in_final = dict.fromkeys(tasks, 0)
    votes = [0] * (len(tasks) + 1)
    total = 0
    for name, m in final.items():
        own = {t: _as_bool(task_masks[t][name], m.shape) for t in tasks}
        for a, b in pair:
            pair[(a, b)] += int((own[a] & own[b]).sum())
        n_votes = torch.zeros(m.shape, dtype=torch.int16)
        for t in tasks:
            in_final[t] += int((own[t] & m).sum())
            n_votes += own[t].to(torch.int16)
        counts = torch.bincount(n_votes[m].long(), minlength=len(tasks) + 1)
        votes = [v + int(c) for v, c in zip(votes, counts)]
        total += int(m.sum())
    return {"pairwise": {f"{a}|{b}": v / max(1, total) for (a, b), v in pair.items()},
            "in_final": {t: v / max(1, total) for t, v in in_final.items()},
            "final_votes": [v / max(1, total) for v in votes], "chance": ratio}


def _as_bool(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask.cpu()
    return unpack_mask(mask.cpu(), math.prod(shape)).view(shape)


def save_masks(directory: str | Path, masks: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``directory/masks.safetensors`` (bit-packed uint8 per tensor) and ``masks.json`` (shapes + meta)."""
    directory = Path(directory)
    packed = {n: pack_mask(m.cpu()).contiguous() for n, m in masks.items()}
    info = {"format": "zolm-masks-v1", "packing": "pack_mask: bit i & 7 of byte i >> 3, row-major",
            "shapes": {n: list(m.shape) for n, m in masks.items()},
            "counts": {n: int(m.sum()) for n, m in masks.items()}, **meta}
    atomic_write_json(directory / META_FILE, info)  # first: a masks file without its JSON is never read
    atomic_write_bytes(directory / MASK_FILE, st_save(packed))


def load_masks(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(bool masks, meta)`` written by :func:`save_masks`."""
    directory = Path(directory)
    if not (directory / MASK_FILE).is_file() or not (directory / META_FILE).is_file():
        raise ZolmError(f"no masks in {directory} (expected {MASK_FILE} and {META_FILE})")
    meta = json.loads((directory / META_FILE).read_text())
    packed = st_load((directory / MASK_FILE).read_bytes())
    masks = {}
    for name, shape in meta["shapes"].items():
        masks[name] = unpack_mask(packed[name], math.prod(shape)).view(*shape)
        if int(masks[name].sum()) != meta["counts"][name]:
            raise ZolmError(f"{directory / MASK_FILE}: mask {name} does not match its recorded count")
    return masks, meta


def check_kind(kind: str) -> str:
    if kind not in MASK_KINDS:
        raise unknown("mask kind", kind, MASK_KINDS)
    return kind
