"""Which training examples each step uses: a pure function of (seed, task, step).

Single task (MeZO's loader): every epoch is a fresh seeded permutation cut into ``n // batch_size`` full
batches, the remainder dropped; with fewer examples than ``batch_size`` every step uses all of them.

Several tasks (a mixture, e.g. for MaZO): task t receives ``c_t(s)`` of the ``batch_size`` slots of step s,
with the boundaries ``b_t(s) = round(batch_size * s * (w_1 + ... + w_t))`` so that
``c_t(s) = [b_t(s) - b_(t-1)(s)] - [b_t(s-1) - b_(t-1)(s-1)]``: every step is exactly ``batch_size`` examples
and, over S steps, task t gets ``batch_size * S * w_t`` of them up to rounding (the proportions hold
exactly, not only in expectation). Each task reads its own stream of seeded permutations.
"""

from __future__ import annotations

import numpy as np

from zolm.errors import ZolmError
from zolm.zo.rng import derive_seed


def _permutation(n: int, seed: int, task: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, 0xDA7A + task, epoch) % (1 << 63)).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> tuple[list[int], int]:
    """Single task: example indices of step ``step`` (1-based) and its epoch."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step - 1, per_epoch)
    return _permutation(n, seed, 0, epoch)[pos * batch_size:(pos + 1) * batch_size].tolist(), epoch


def _bounds(batch_size: int, weights: list[float], steps: int) -> list[int]:
    """b_t(steps) for t = 0..T: how many of the first ``steps`` steps' examples tasks < t received."""
    cum = np.cumsum(np.asarray(weights, dtype=np.float64) / sum(weights))
    return [0] + [int(round(batch_size * steps * c)) for c in cum[:-1]] + [batch_size * steps]


def allocation(batch_size: int, weights: list[float], step: int) -> list[int]:
    """How many of step ``step``'s examples come from each task (sums to batch_size; see module doc)."""
    now, before = _bounds(batch_size, weights, step), _bounds(batch_size, weights, step - 1)
    return [(now[t + 1] - now[t]) - (before[t + 1] - before[t]) for t in range(len(weights))]


class Mixture:
    """Per-step example indices for one or several tasks (``sizes`` = training examples per task)."""

    def __init__(self, sizes: list[int], batch_size: int, seed: int, weights: list[float] | None = None):
        if weights is not None and (len(weights) != len(sizes) or any(w < 0 for w in weights) or not sum(weights)):
            raise ZolmError(f"task weights must be {len(sizes)} non-negative numbers, not all zero; got {weights}")
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.weights = weights or [1.0] * len(sizes)

    def step(self, step: int) -> tuple[list[list[int]], int]:
        """([indices of each task], epoch) for training step ``step`` (1-based)."""
        if len(self.sizes) == 1:
            idx, epoch = batch_indices(self.sizes[0], self.batch_size, self.seed, step)
            return [idx], epoch
        out = []
        counts = allocation(self.batch_size, self.weights, step)
        before = _bounds(self.batch_size, self.weights, step - 1)
        for t, (n, count) in enumerate(zip(self.sizes, counts)):
            start = before[t + 1] - before[t]  # examples task t received in steps 1 .. step-1
            perms: dict[int, np.ndarray] = {}
            idx = []
            for p in range(start, start + count):
                if p // n not in perms:
                    perms[p // n] = _permutation(n, self.seed, t, p // n)
                idx.append(int(perms[p // n][p % n]))
            out.append(idx)
        epoch = (step - 1) * self.batch_size // sum(self.sizes)
        return out, epoch
