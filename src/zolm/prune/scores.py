"""Pruning scores: pure functions of a weight ``W`` (``[out, in]``) and calibration statistics.

A higher score means more important; the masks in :mod:`zolm.prune.masks` drop the lowest scores of each
comparison group. Scores are computed in float32 whatever the weight's dtype.
"""

from __future__ import annotations

import torch


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| (the magnitude baseline; compared over the whole layer in Wanda's code)."""
    return weight.detach().float().abs()


def wanda(weight: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2024, Eq. 1): S_ij = |W_ij| * ||X_j||_2, compared within each output row.

    Args:
        weight: ``[out, in]``.
        x_norm: ``[in]``, the L2 norm of input feature j over the calibration tokens, normalised as in Wanda's
            code: sqrt((1/N) sum over the N sequences and their tokens of x_j^2) (see ``InputStats.norm``).
    """
    return weight.detach().float().abs() * x_norm.float().unsqueeze(0)


def wanda_pp(weight: torch.Tensor, x_norm: torch.Tensor, grad_rms: torch.Tensor, alpha: float) -> torch.Tensor:
    """Wanda++ regional gradient score (Yang et al. 2025, Sec. 3.1): S_ij = (alpha * G_ij + ||X_j||_2) * |W_ij|.

    Args:
        weight: ``[out, in]``.
        x_norm: ``[in]``, Wanda's input-feature norm (same normalisation as :func:`wanda`).
        grad_rms: ``[out, in]``, G_ij = sqrt((1/N) sum_n (d||f(X_n)||_2 / dW_ij)^2), the RMS over calibration
            sequences of the gradient of the block-output norm (``zolm.prune.regional.regional_gradients``).
        alpha: weight of the gradient term (paper default 100). With ``alpha = 0`` this is Wanda's score.
    """
    return (alpha * grad_rms.float() + x_norm.float().unsqueeze(0)) * weight.detach().float().abs()


def grad_to_norm_ratio(x_norm: torch.Tensor, grad_rms: torch.Tensor, alpha: float) -> float:
    """mean(alpha * G) / mean(||X_j||): how much the gradient term weighs against Wanda's term in one layer."""
    return float(alpha * grad_rms.float().mean() / x_norm.float().mean().clamp(min=1e-30))
