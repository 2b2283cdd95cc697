"""Tensor-train (TT) linear layers and the tensorized bottleneck adapter of AdaZeta (papers.md 6.1-6.2).

A weight mapping N inputs to M outputs is stored as 2o TT cores (Oseledets 2011; LoRETTA / AdaZeta):

    W(a_1..a_o, b_1..b_o) = G_1[:, a_1, :] ... G_o[:, a_o, :] G_(o+1)[:, b_1, :] ... G_2o[:, b_o, :]
    G_k in R^(r_(k-1) x k_k x r_k),  r_0 = r_2o = 1,  every inner rank = r,  N = prod n_i, M = prod m_i
    #params = sum_k r_(k-1) k_k r_k   (+ M for the bias)

The forward never forms the M x N matrix: the first o cores contract to L [N, r], the last o to R [r, M]
(a few thousand numbers), and y = (x @ L) @ R + bias costs O(N r + r M) per token (AdaZeta's "parallel"
forward). ``dense_weight()`` rebuilds W for tests and merging only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zolm.errors import ZolmError

ACTIVATIONS = {"relu": F.relu, "identity": lambda x: x}
INITS = ("zero-up", "reference")  # TT adapter initialisations (TTAdapter)


def _factorizations(n: int, parts: int, smallest: int) -> list[list[int]]:
    """Every non-decreasing factorisation of ``n`` into ``parts`` factors, each >= ``smallest``."""
    if parts == 1:
        return [[n]] if n >= smallest else []
    out = []
    f = smallest
    while f ** parts <= n:
        if n % f == 0:
            out += [[f, *rest] for rest in _factorizations(n // f, parts - 1, f)]
        f += 1
    return out


def factorize(n: int, modes: int = 3) -> list[int]:
    """The most balanced factorisation of ``n`` into ``modes`` factors >= 2, in ascending order.

    Rule: among all factorisations into ``modes`` integers >= 2, take the one with the smallest largest
    factor, ties broken by the largest smallest factor. This reproduces the paper's shapes (4096 ->
    16 x 16 x 16, 64 -> 4 x 4 x 4) and gives 576 -> 8 x 8 x 9 for SmolLM2. Raises ZolmError when no such
    factorisation exists (a prime size, or fewer prime factors than modes).
    """
    if n < 2 or modes < 1:
        raise ZolmError(f"cannot factorise {n} into {modes} TT modes")
    options = _factorizations(n, modes, 2)
    if not options:
        raise ZolmError(f"size {n} does not factorise into {modes} TT modes >= 2 (prime factors: "
                        f"{'x'.join(map(str, _factorizations_primes(n)))}); set the modes explicitly or use "
                        f"fewer modes")
    return min(options, key=lambda f: (max(f), -min(f)))


def _factorizations_primes(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def tt_num_params(in_modes: Sequence[int], out_modes: Sequence[int], rank: int, bias: bool = True) -> int:
    """sum_k r_(k-1) * k_k * r_k over the 2o cores (r_0 = r_2o = 1), plus the bias (papers.md 6.1)."""
    dims = list(in_modes) + list(out_modes)
    ranks = [1] + [rank] * (len(dims) - 1) + [1]
    return sum(ranks[k] * d * ranks[k + 1] for k, d in enumerate(dims)) + (math.prod(out_modes) if bias else 0)


class TTLinear(nn.Module):
    """y = x @ W^T + b with W [M, N] held as a tensor train (never formed in the forward).

    Args:
        in_modes: n_1..n_o with prod = N (input features); the input is reshaped row-major.
        out_modes: m_1..m_o with prod = M (output features).
        rank: the inner TT rank r.
        bias: learn a bias of size M.
        generator: torch.Generator for the initialisation (deterministic adapters).

    Initialisation (AdaZeta code, papers.md 6.1): core k ~ N(0, 1) / sqrt(r_k) * target^(1/(2o)) with
    target = sqrt(1 / (N + M)), so every entry of W has standard deviation ``target`` (Xavier-like; the
    layer is not zero); bias ~ U(-1/sqrt(M), 1/sqrt(M)).
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], rank: int, bias: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        if len(in_modes) != len(out_modes) or not in_modes:
            raise ZolmError(f"TT input and output need the same number of modes, got {list(in_modes)} and "
                            f"{list(out_modes)}")
        if rank < 1 or min(*in_modes, *out_modes) < 1:
            raise ZolmError(f"TT rank and modes must be >= 1, got rank {rank}, modes {list(in_modes)}, "
                            f"{list(out_modes)}")
        self.in_modes, self.out_modes, self.rank = list(in_modes), list(out_modes), rank
        self.in_features, self.out_features = math.prod(in_modes), math.prod(out_modes)
        dims = self.in_modes + self.out_modes
        ranks = [1] + [rank] * (len(dims) - 1) + [1]
        scale = math.sqrt(1.0 / (self.in_features + self.out_features)) ** (1.0 / len(dims))
        for k, d in enumerate(dims):
            core = torch.randn(ranks[k], d, ranks[k + 1], generator=generator) * (scale / math.sqrt(ranks[k + 1]))
            self.register_parameter(f"core_{k}", nn.Parameter(core))
        if bias:
            bound = 1.0 / math.sqrt(self.out_features)
            b = torch.rand(self.out_features, generator=generator) * (2 * bound) - bound
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    @property
    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core_{k}") for k in range(2 * len(self.in_modes))]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L [N, r], R [r, M]) with W^T = L @ R: the two halves of the train, contracted over their ranks."""
        cores = self.cores
        o = len(self.in_modes)
        left = cores[0].reshape(-1, cores[0].shape[-1])  # [n_1, r]
        for g in cores[1:o]:  # [n_1..n_k, r] @ [r, n_(k+1) r] -> [n_1..n_(k+1), r] (row-major index)
            left = (left @ g.reshape(g.shape[0], -1)).reshape(-1, g.shape[-1])
        right = cores[o]  # [r, m_1, r]
        for g in cores[o + 1:]:  # [r, m_1..m_k, r] -> [r, m_1..m_(k+1), r_next]
            right = (right.reshape(-1, right.shape[-1]) @ g.reshape(g.shape[0], -1)).reshape(
                right.shape[0], -1, g.shape[-1])
        return left, right.reshape(right.shape[0], -1)  # [N, r], [r, M]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., N] -> [..., M]; the contraction goes through the rank r, never through an N x M matrix."""
        if x.shape[-1] != self.in_features:
            raise ZolmError(f"TTLinear expects {self.in_features} input features, got {x.shape[-1]}")
        left, right = self.factors()
        y = (x @ left) @ right  # [..., r] then [..., M]
        return y + self.bias if self.bias is not None else y

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """W [M, N] rebuilt from the cores (tests and merging only)."""
        left, right = self.factors()
        return (left @ right).T.contiguous()

    def extra_repr(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, rank={self.rank}, bias={self.bias is not None}"


class TTAdapter(nn.Module):
    """Adapter(x) = x + s * TT_up(act(TT_down(x))), computed in float32 (papers.md 6.2).

    Args:
        hidden_modes: factorisation of the hidden size H (the side of the base layer it sits on).
        bottleneck_modes: factorisation of the bottleneck b.
        rank: TT rank of both layers.
        activation: "relu" (AdaZeta) or "identity" (makes the adapter linear, hence mergeable).
        scaling: s.
        bias: give both TT layers a bias (AdaZeta does).
        generator: torch.Generator for the initialisation.
        init: "zero-up" (zolm default: TT_up's last core and bias start at zero, so the adapter starts as the
            identity, as LoRA zeroes B) or "reference" (AdaZeta's code: both layers Xavier-like, which at
            hidden size 576 changes each adapted input by ~0.2 RMS and SmolLM2's SST-2 loss by ~0.7 nats).
            Both draw the same random numbers, so "zero-up" is "reference" with those tensors zeroed.
    """

    def __init__(self, hidden_modes: Sequence[int], bottleneck_modes: Sequence[int], rank: int,
                 activation: str = "relu", scaling: float = 1.0, bias: bool = True,
                 generator: torch.Generator | None = None, init: str = "zero-up"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ZolmError(f"unknown adapter activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if init not in INITS:
            raise ZolmError(f"unknown adapter init {init!r}; valid: {', '.join(INITS)}")
        self.activation, self.scaling = activation, float(scaling)
        self.down = TTLinear(hidden_modes, bottleneck_modes, rank, bias, generator)
        self.up = TTLinear(bottleneck_modes, hidden_modes, rank, bias, generator)
        if init == "zero-up":
            with torch.no_grad():
                self.up.cores[-1].zero_()
                if self.up.bias is not None:
                    self.up.bias.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * TT_up(act(TT_down(x))) in float32."""
        return self.scaling * self.up(ACTIVATIONS[self.activation](self.down(x.float())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() + self.delta(x)).to(x.dtype)

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [H, H], c [H]) with Adapter(x) = A x + c; only defined for the identity activation.

        A = I + s U D and c = s (U b_down + b_up), where D, U are the dense TT_down, TT_up weights.
        """
        if self.activation != "identity":
            raise ZolmError(f"a {self.activation} adapter is not linear, so it cannot be merged into the base "
                            "weights; only adapters with activation 'identity' merge")
        d, u = self.down.dense_weight().double(), self.up.dense_weight().double()  # [b, H], [H, b]
        a = torch.eye(u.shape[0], dtype=torch.float64, device=u.device) + self.scaling * (u @ d)
        c = torch.zeros(u.shape[0], dtype=torch.float64, device=u.device)
        if self.down.bias is not None:
            c += u @ self.down.bias.double()
        if self.up.bias is not None:
            c += self.up.bias.double()
        return a, self.scaling * c
