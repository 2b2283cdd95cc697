"""MaZO weight importance: per-task statistics -> per-task score -> row-normalised score.

Structure (Zhang et al. 2025, "MaZO", arXiv 2502.11513, Sec. 3, as summarised in papers.md 5.2 [SEC]), per task
t and weight matrix W (``[out, in]``, rows = output neurons):

    S^t     = S^t_global + alpha * S^t_greedy + beta * |W|          per-task raw score
    S_hat^t = S^t / (max_j S^t[i, j] + 1e-12)                       per task and per row i

The paper's method section could not be retrieved (only its abstract and secondary summaries were reachable
through the search tool), so the two terms are zolm's documented default of papers.md 5.3 [INFERRED]:

    g = mean_b g_b,   h = mean_b g_b^2   (g_b: gradient of task t's loss on calibration mini-batch b)
    S_greedy = g^2                                   first-order loss decrease of one SGD step (per unit lr)
    S_global = g^2 / (2 (h + lambda)),  lambda = damping * mean(h)   decrease at the minimum of the local
                                                                     quadratic: what freezing the weight forgoes

``curvature="activation"`` (the default) is zolm's reading of the paper's "row-wise approximation" (not
retrieved either): h is replaced by the layer-local Gauss-Newton curvature of one row, h_ij = mean over tokens
of x_j^2 (the column statistic Wanda uses), identical for every row.
Every constant is an option of :class:`ImportanceConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zolm.errors import ZolmError, unknown

ROW_NORM_EPS = 1e-12  # papers.md 5.3: S / (max_j S + 1e-12)
DAMPING = 1e-8  # papers.md 5.3: lambda = 1e-8 * mean(h)
CURVATURES = ("fisher", "activation")


@dataclass
class ImportanceConfig:
    """How a task's statistics become a score (defaults: papers.md 5.3).

    Args:
        alpha: weight of S_greedy.
        beta: weight of the magnitude term |W|.
        curvature: ``activation`` (h_ij = mean x_j^2, the default since issue 13) or ``fisher`` (h = mean of squared
            mini-batch gradients: S_global = g^2 / (2 h) then lies in [0, 1/2] and measures how consistent the
            gradient's sign is across mini-batches, not its size; on SmolLM2 its mask keeps 0.25 of the held-out
            gradient's mass against 0.84 for ``activation``, benchmarks/mazo_importance.py).
        damping: lambda = damping * mean(h), per tensor.
        row_eps: the constant added to each row's maximum when normalising.
        term_norm: row-normalise each term before weighting them (ours, off by default). The terms have different
            units (S_global is a ratio in [0, 1/2] under ``fisher``, S_greedy = g^2 is typically 1e-10..1e-4), so
            without it alpha and beta are not relative weights; see docs/mazo.md.
    """

    alpha: float = 1.0
    beta: float = 0.0
    curvature: str = "activation"
    damping: float = DAMPING
    row_eps: float = ROW_NORM_EPS
    term_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "damping", "row_eps"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v >= 0 and math.isfinite(v)):
                raise ZolmError(f"importance {name} must be a finite number >= 0, got {v}")
        if self.curvature not in CURVATURES:
            raise unknown("importance curvature", self.curvature, CURVATURES)


@dataclass
class GradStats:
    """Running statistics of one task for one weight ``[out, in]`` (float32, on the weight's device).

    ``grad_sum`` / ``grad_sq_sum`` add up the mini-batch gradients g_b and g_b^2; ``act_sq_sum`` adds up x_j^2
    over the ``tokens`` input rows the layer saw (only collected for ``curvature="activation"``).
    """

    grad_sum: torch.Tensor
    grad_sq_sum: torch.Tensor
    batches: int = 0
    act_sq_sum: torch.Tensor | None = None
    tokens: int = 0
    transposed: bool = False  # the weight is stored [in, out] (GPT-2 Conv1D): inputs index its rows

    @classmethod
    def zeros(cls, weight: torch.Tensor, activations: bool = False, transposed: bool = False) -> GradStats:
        z = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        size = weight.shape[0 if transposed else 1]
        act = torch.zeros(size, dtype=torch.float32, device=weight.device) if activations else None
        return cls(z, z.clone(), 0, act, 0, transposed)

    def add_grad(self, g: torch.Tensor) -> None:
        g = g.detach().float()
        self.grad_sum.add_(g)
        self.grad_sq_sum.addcmul_(g, g)
        self.batches += 1

    def add_inputs(self, x: torch.Tensor) -> None:
        """Accumulate x_j^2 from a layer input ``[..., in]`` (padding included, as Wanda's statistic is)."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.act_sq_sum.add_((x * x).sum(0))
        self.tokens += x.shape[0]

    def mean_grad(self) -> torch.Tensor:
        return self.grad_sum / max(1, self.batches)

    def curvature(self, kind: str) -> torch.Tensor:
        """h: ``[out, in]`` (fisher) or ``[1, in]`` (activation, the same for every row; ``[in, 1]`` for a weight
        stored transposed)."""
        if kind == "fisher":
            return self.grad_sq_sum / max(1, self.batches)
        if self.act_sq_sum is None:
            raise ZolmError("activation curvature needs input statistics (collect them with activations=True)")
        return (self.act_sq_sum / max(1, self.tokens)).unsqueeze(1 if self.transposed else 0)


def greedy_term(g: torch.Tensor) -> torch.Tensor:
    """S_greedy = g^2: the loss decrease of one SGD step of unit learning rate, to first order (papers.md 5.3)."""
    return g * g


def global_term(g: torch.Tensor, h: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """S_global = g^2 / (2 (h + lambda)), lambda = damping * mean(h) (papers.md 5.3).

    The decrease of the one-coordinate quadratic model L + g d + h d^2 / 2 at its minimum d = -g / (h + lambda).
    Zero where g is zero; a coordinate whose h + lambda is 0 (then g is 0 as well under ``fisher``) scores 0.
    """
    denom = 2 * (h + damping * h.mean())
    return torch.where(denom > 0, g * g / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(g))


def magnitude_term(weight: torch.Tensor) -> torch.Tensor:
    """|W|: zero exactly where the weight is zero."""
    return weight.detach().float().abs()


def row_normalize(score: torch.Tensor, eps: float = ROW_NORM_EPS) -> torch.Tensor:
    """S_hat[i, :] = S[i, :] / (max_j S[i, j] + eps) (papers.md 5.3), for a non-negative ``[out, in]`` score."""
    return score / (score.amax(dim=-1, keepdim=True) + eps)


def score_terms(stats: GradStats, weight: torch.Tensor, config: ImportanceConfig) -> dict[str, torch.Tensor]:
    """The three terms of one task for one weight: ``{"global", "greedy", "magnitude"}`` (``[out, in]`` each)."""
    g = stats.mean_grad()
    return {"global": global_term(g, stats.curvature(config.curvature), config.damping),
            "greedy": greedy_term(g), "magnitude": magnitude_term(weight)}


def task_score(stats: GradStats, weight: torch.Tensor, config: ImportanceConfig) -> torch.Tensor:
    """S^t = S_global + alpha S_greedy + beta |W| (MaZO's structure; terms from papers.md 5.3), not yet normalised.

    With ``config.term_norm`` each term is first row-normalised, so alpha and beta weigh comparable quantities.
    """
    terms = score_terms(stats, weight, config)
    if config.term_norm:
        terms = {k: row_normalize(v, config.row_eps) for k, v in terms.items()}
    score = terms["global"]
    if config.alpha:
        score = score + config.alpha * terms["greedy"]
    if config.beta:
        score = score + config.beta * terms["magnitude"]
    return score


def normalized_task_score(stats: GradStats, weight: torch.Tensor, config: ImportanceConfig) -> torch.Tensor:
    """S_hat^t: task t's score with every row divided by its maximum (+ row_eps), ready to be summed over tasks."""
    return row_normalize(task_score(stats, weight, config), config.row_eps)
