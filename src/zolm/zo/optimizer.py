"""The ZO optimiser: n-query SPSA steps with a fused restore-and-update pass.

MeZO's step (Malladi et al. 2023, Algorithm 1) perturbs +eps z, -2 eps z, +eps z, then regenerates z once
more for the update: four passes over the weights. zolm fuses the restore with the update
(theta <- (theta + eps z) - (lr g / n) z, two exact coefficients in one pass), so a one-query step makes three
passes, each a single vectorised kernel over the weights with no temporary (see zolm.zo.rng). How half-precision
tensors move (float32 masters, virtual perturbation + stochastic rounding, or in place) is
``ZOConfig.half_mode`` (zolm.zo.precision).

Subclasses change the ZO method by overriding :meth:`ZOOptimizer.apply_` (how theta moves along z) or
``param_set``'s masks; the step logic, seeds and the replay record stay here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from zolm.errors import ZolmError
from zolm.zo.precision import WeightStore, check_half_mode
from zolm.zo.rng import SAMPLERS, derive_seed
from zolm.zo.spsa import ParamSet

# MeZO skips weight decay for names containing these (its trainer's test); Llama's final "model.norm"
# is not caught by it, a quirk kept for fidelity and documented in docs/methods.md.
NO_DECAY = ("bias", "layer_norm", "layernorm")


class DivergenceError(ZolmError):
    """The loss became NaN or infinite; the weights were restored to their values before the step."""


@dataclass
class ZOConfig:
    """Hyper-parameters shared by every ZO method (MeZO defaults, Malladi et al. 2023, App. E)."""

    eps: float = 1e-3
    queries: int = 1
    weight_decay: float = 0.0
    sampler: str = "ih4"
    seed: int = 0
    half_mode: str = "exact"  # bf16/fp16 tensors: exact (float32 masters), lean, inplace (zolm.zo.precision)

    def __post_init__(self) -> None:
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ZolmError(f"eps must be a positive number, got {self.eps}")
        if self.queries < 1:
            raise ZolmError(f"queries must be >= 1, got {self.queries}")
        if self.weight_decay < 0:
            raise ZolmError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.sampler not in SAMPLERS:
            raise ZolmError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        check_half_mode(self.half_mode)


@dataclass
class StepRecord:
    """What a ZO step needs to be replayed: its seeds, projected gradients and learning rate."""

    step: int
    seeds: list[int]
    grads: list[float]
    lr: float
    loss: float = field(default=float("nan"))

    def to_json(self) -> dict:
        return {"step": self.step, "seeds": self.seeds, "grads": self.grads, "lr": self.lr}


class ZOOptimizer:
    """Zeroth-order SGD over a :class:`ParamSet` (MeZO when used as is)."""

    method = "mezo"

    def __init__(self, params: ParamSet, config: ZOConfig | None = None):
        self.params = params
        self.config = config or ZOConfig()
        self.decay = [not any(k in n.lower() for k in NO_DECAY) for n in params.names]
        self.store = WeightStore(params, self.config.half_mode, self.config.sampler)

    # ------------------------------------------------------------------ hooks for other ZO methods
    def apply_(self, seed: int, coef: float) -> float:
        """theta <- theta + coef * z(seed). Methods with another weight domain override this."""
        return self.store.apply_(seed, coef)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint besides the trained ones (float32 masters of half tensors)."""
        return self.store.extra_state()

    def header(self) -> dict:
        """Everything besides the per-step records that replay needs, written at the top of the log."""
        return {"method": self.method, **asdict(self.config), "param_names": self.params.names,
                "decay": self.decay}

    # ------------------------------------------------------------------ the step
    def seeds_for(self, step: int, queries: int) -> list[int]:
        """Seeds are a pure function of (run seed, step, query): resuming needs no RNG state."""
        return [derive_seed(self.config.seed, step, q) for q in range(queries)]

    @torch.no_grad()
    def step(self, loss_fn: Callable[[], float], step: int, lr: float, queries: int | None = None) -> StepRecord:
        """One ZO step at learning rate ``lr`` with ``queries`` SPSA queries (default: config.queries).

        ``loss_fn`` evaluates the mini-batch loss at the current (perturbed) weights and returns a float;
        every query uses the same mini-batch. Raises DivergenceError, with the weights restored, if a loss
        is not finite.
        """
        n = queries or self.config.queries
        eps = self.config.eps
        seeds = self.seeds_for(step, n)
        grads, losses = [], []
        for q, seed in enumerate(seeds):
            eps_applied = self.apply_(seed, eps)
            lp = loss_fn()
            self.store.check_forward()
            self.apply_(seed, -2 * eps)
            lm = loss_fn()
            if not (math.isfinite(lp) and math.isfinite(lm)):
                self.apply_(seed, eps)  # restore; earlier queries were restored already
                raise DivergenceError(f"loss is not finite at step {step} (L+={lp}, L-={lm})")
            grads.append((lp - lm) / (2 * eps_applied))
            losses.append(0.5 * (lp + lm))
            if q < n - 1:
                self.apply_(seed, eps)  # restore; the last query's restore is fused with its update
        self.update_(seeds, grads, lr)
        return StepRecord(step=step, seeds=seeds, grads=grads, lr=lr, loss=sum(losses) / n)

    @torch.no_grad()
    def update_(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """theta <- theta (1 - lr wd) - lr * mean_q(g_q z_q), the last restore fused in (zolm.zo.precision).

        Called right after the last query's minus-side loss, i.e. with theta perturbed by -eps z_last.
        """
        n = len(seeds)
        self.store.update_(seeds, [-lr * g / n for g in grads], self.config.weight_decay, lr, self.decay)

    def replay_(self, record: dict) -> None:
        """Re-apply a logged step without any forward pass: the same operations in the same order."""
        seeds, grads, lr = record["seeds"], record["grads"], record["lr"]
        eps = self.config.eps
        for q, seed in enumerate(seeds):
            self.apply_(seed, eps)
            self.apply_(seed, -2 * eps)
            if q < len(seeds) - 1:
                self.apply_(seed, eps)
        self.update_(seeds, grads, lr)

