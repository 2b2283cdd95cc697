"""Sparsity masks from scores, and checks of the sparsity a weight achieved.

Masks are *keep* masks: ``True`` marks a weight that stays. Every function takes a score of the weight's
``[out, in]`` shape (PyTorch layout: rows are output neurons, columns input features) and removes the
lowest-scoring weights of each comparison group:

* ``row``: every output row loses ``round(s * in)`` weights (Wanda's group, Sun et al. 2024, Sec. 3);
* ``layer``: the whole matrix loses ``round(s * numel)`` weights (the magnitude baseline of Wanda's code);
* N:M: in every group of M consecutive input columns of a row, N weights stay and M - N go (the layout 2:4
  sparse tensor cores read; groups run along the input dimension).

Counts are exact: the lowest-k are chosen with ``topk``, never by thresholding (ties cannot change the count).
Pruned entries are written as +0.0 (``masked_fill_``), so a weight's zeros are exactly its pruned entries.
"""

from __future__ import annotations

import re

import torch

from zolm.errors import ZolmError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M consecutive input weights; needs 0 < N < M."""
    match = _NM.match(str(text))
    if not match:
        raise ZolmError(f"N:M pattern must look like 2:4 (keep N of every M weights), got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ZolmError(f"N:M pattern {text!r} needs 0 < N < M (keep N of every M weights)")
    return n, m


def n_pruned(size: int, sparsity: float) -> int:
    """How many of ``size`` weights a group loses at ``sparsity`` (the nearest integer)."""
    return int(round(sparsity * size))


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask (same shape as the 2-D ``score``) dropping the ``k`` lowest entries of each row."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(-1, torch.topk(score, k, dim=-1, largest=False).indices, False)
    return keep


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing the ``round(sparsity * in)`` lowest scores of every row."""
    return _lowest(score, n_pruned(score.shape[1], sparsity))


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing the ``round(sparsity * numel)`` lowest scores of the whole matrix."""
    return _lowest(score.reshape(1, -1), n_pruned(score.numel(), sparsity)).view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with exactly ``n`` weights kept in every group of ``m`` consecutive input columns."""
    rows, cols = score.shape
    if cols % m:
        raise ZolmError(f"N:M with M={m} needs the input dimension to be a multiple of {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)  # [rows, groups, m]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, m - n, dim=-1, largest=False).indices, False)
    return keep.view(rows, cols)


def make_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, group: str = "row") -> torch.Tensor:
    """The keep mask of one layer: N:M if ``nm`` is given, else unstructured over ``group`` (row or layer)."""
    if nm is not None:
        return nm_mask(score, *nm)
    if group == "row":
        return row_mask(score, sparsity)
    if group == "layer":
        return layer_mask(score, sparsity)
    raise ZolmError(f"unknown comparison group {group!r}; valid: layer, row")


@torch.no_grad()
def apply_mask_(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` in place (as +0.0) and return it."""
    return weight.masked_fill_(~keep, 0.0)


def sparsity(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / max(1, weight.numel())


def row_sparsity(weight: torch.Tensor) -> torch.Tensor:
    """Fraction of zeros in each row of an ``[out, in]`` weight ([out])."""
    return (weight == 0).float().mean(dim=1)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups (along the input dimension) holding more than ``n`` non-zeros."""
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // m, m).sum(-1)
    return int((nonzero > n).sum())
