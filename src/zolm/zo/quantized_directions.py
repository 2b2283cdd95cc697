"""QuZO's quantized perturbations on float tensors (LoRA / TT adapters, float masters), papers.md section 4.

Per query, with u the unit-variance draw of each trained tensor (zolm.zo.rng, ih4):
    u1 = Q_A(u), u2 = Q_B(u)        two stochastic roundings of the same draw to ``perturb_bits`` bits
                                    (independent rounding streams A and B; u2 = u1 when two_draws is off)
    L+- = L(theta +- eps u1)        the perturbation is applied in place, as MeZO does
    theta <- theta - lr g u2        restore first (+eps u1), then the update along u2
E[u1 u2^T | u] = u u^T: the estimate is unbiased, as on low-bit codes (zolm.zo.quzo); only the weight domain
differs. Coefficients are rounded to 14 significant bits so coef x level is exact in float32, and replay redoes
the same passes: training, resume and replay give the same bits.
"""

from __future__ import annotations

import torch

from zolm.errors import ZolmError
from zolm.zo.optimizer import ZOConfig, ZOOptimizer
from zolm.zo.quzo import STREAM_A, STREAM_B, QuZOSettings, perturb_weight_, stream_key
from zolm.zo.rng import round_coef, tensor_key
from zolm.zo.spsa import ParamSet


class QuantizedDirectionZO(ZOOptimizer):
    """ZO-SGD over float32 tensors whose perturbation and update directions are quantized (QuZO on adapters)."""

    method = "quzo-float"

    def __init__(self, params: ParamSet, config: ZOConfig | None = None, settings: QuZOSettings | None = None):
        config = config or ZOConfig()
        self.settings = settings or QuZOSettings()
        if self.settings.perturb_bits < 1:
            raise ZolmError("QuantizedDirectionZO needs perturb_bits >= 1 (0 is plain MeZO)")
        if config.sampler != "ih4":
            raise ZolmError("quantized perturbations round the ih4 draw; use sampler ih4")
        if config.weight_decay:
            raise ZolmError("weight decay is not supported with quantized perturbations; use weight_decay 0")
        bad = [(n, p.dtype) for n, p in zip(params.names, params.params) if p.dtype != torch.float32]
        if bad:
            raise ZolmError(f"quantized perturbations train float32 tensors; {bad[0][0]} is {bad[0][1]} "
                            "(train adapters, which are float32, or load the model in float32)")
        super().__init__(params, config)
        self._last: tuple[int, float] | None = None  # (seed, accumulated coefficient) of the perturbation in place

    def _axpy_(self, seed: int, a: float, stream: int) -> None:
        L = self.settings.levels
        for i, (p, m) in enumerate(zip(self.params.params, self.params.masks)):
            perturb_weight_(p.data, tensor_key(seed, i), stream_key(seed, i, stream), a, L, m)

    def apply_(self, seed: int, coef: float) -> float:
        """theta <- theta + coef u1(seed); returns the exact coefficient applied (in units of u)."""
        unit = self.settings.unit
        a = round_coef(coef * unit)
        self._axpy_(seed, a, STREAM_A)
        acc = (self._last[1] if self._last and self._last[0] == seed else 0.0) + a
        self._last = (seed, acc)
        return a / unit

    @torch.no_grad()
    def update_(self, seeds: list[int], grads: list[float], lr: float) -> None:
        """Undo the last query's perturbation, then theta <- theta - lr/n sum_q g_q u2_q."""
        if self._last is not None and self._last[1] != 0.0:
            self._axpy_(self._last[0], -self._last[1], STREAM_A)
        self._last = None
        s, n = self.settings, len(seeds)
        for seed, g in zip(seeds, grads):
            c = round_coef(-lr * g / n * s.unit)
            if c != 0.0:
                self._axpy_(seed, c, STREAM_B if s.two_draws else STREAM_A)

    def header(self) -> dict:
        return {**super().header(), "perturb_bits": self.settings.perturb_bits, "two_draws": self.settings.two_draws}
