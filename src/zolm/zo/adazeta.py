"""AdaZeta's adaptive query schedule (Yang et al. 2024, papers.md 6.4).

The number of SPSA queries per step grows sub-linearly with the epoch, which makes the ZO error term
sum_k 1/Q_k of the convergence bound shrink (papers.md 6.4, "Theory"). zolm implements the form of the
paper's released code (trainer_adazeta.py), a power law in the *epoch* index e:

    Q_e = min( max( floor(alpha * e^beta), 1 ), Q_max )          Q fixed within an epoch

With ``beta=None`` beta is fitted as the code does unless its ``--use_num`` flag is set, so that the
schedule reaches ``q_target`` at the last epoch:

    beta = ln(q_target / alpha) / ln(total_epochs),   total_epochs = steps / (num_train / batch_size)

(The issue text writes Q_k = min(floor(c e^(beta k)), Q_max): an exponential in the step; the paper and code
use the power law above in the epoch, which is what is implemented.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zolm.errors import ZolmError, unknown

KINDS = ("adaptive", "fixed")


def fit_beta(q_target: float, alpha: float, total_epochs: float) -> float:
    """The exponent that makes alpha * e^beta reach ``q_target`` at e = ``total_epochs`` (AdaZeta code).

    With a single epoch or less the schedule never leaves epoch 0 (Q = 1) and any beta will do: 1.0.
    """
    if total_epochs <= 1.0:
        return 1.0
    return math.log(q_target / alpha) / math.log(total_epochs)


def queries_at(epoch: int, alpha: float, beta: float, q_max: int) -> int:
    """Q_e = min(max(floor(alpha * e^beta), 1), q_max); epoch 0 gives 1 (0^beta = 0, then the max guard)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    raw = alpha * epoch ** beta if epoch > 0 else 0.0
    return min(max(math.floor(raw), 1), q_max)


@dataclass
class QuerySchedule:
    """Queries per step as a function of the epoch: ``adaptive`` (AdaZeta) or ``fixed`` (``queries``).

    Args:
        kind: "adaptive" or "fixed".
        queries: the fixed query count (kind "fixed").
        alpha: multiplier (paper 0.85, code SHRINK).
        beta: exponent (paper 0.45 for Llama-2-7B); None: fitted with :func:`fit_beta`.
        q_max: cap (paper 20; the released script caps at 15).
        q_target: the value reached at the last epoch when beta is fitted (code NUM = 20).
        total_epochs: steps / (num_train / batch_size), for fitting beta.
    """

    kind: str = "adaptive"
    queries: int = 1
    alpha: float = 0.85
    beta: float | None = None
    q_max: int = 20
    q_target: float = 20.0
    total_epochs: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise unknown("query schedule", self.kind, KINDS)
        if self.queries < 1 or self.q_max < 1:
            raise ZolmError(f"queries and q_max must be >= 1, got {self.queries} and {self.q_max}")
        if not (0 < self.alpha and math.isfinite(self.alpha)):
            raise ZolmError(f"q_alpha must be a positive number, got {self.alpha}")
        if self.beta is not None and not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ZolmError(f"q_beta must be a number >= 0, got {self.beta}")
        if not self.q_target >= 1:
            raise ZolmError(f"q_target must be >= 1, got {self.q_target}")
        if self.kind == "adaptive" and self.beta is None:
            self.beta = fit_beta(self.q_target, self.alpha, self.total_epochs)

    def __call__(self, epoch: int) -> int:
        if self.kind == "fixed":
            return self.queries
        return queries_at(epoch, self.alpha, self.beta, self.q_max)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"Q = {self.queries} (fixed)"
        return f"Q_e = min(max(floor({self.alpha:g} * e^{self.beta:.4f}), 1), {self.q_max})"
