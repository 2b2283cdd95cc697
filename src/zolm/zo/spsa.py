"""SPSA with the in-place seed trick (Malladi et al. 2023, Sec. 2.1 and Algorithm 1).

    g_hat = (L(theta + eps z) - L(theta - eps z)) / (2 eps) * z,     z regenerated from a seed, never stored

The scalar (L+ - L-) / (2 eps) is the "projected gradient"; the update regenerates z from the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from zolm.errors import ZolmError
from zolm.utils.patterns import compile_patterns
from zolm.zo.rng import axpy_z_, pack_mask, tensor_key


class ParamSet:
    """The ordered list of tensors that ZO perturbs and updates.

    The order fixes each tensor's index in the perturbation key, so it must be identical wherever z is
    regenerated (training, replay, resume, every worker). ``named_parameters()`` de-duplicates tied
    weights, so a tied embedding / LM head is perturbed once, not twice.

    Args:
        model: any torch module.
        include: regular expressions; a parameter trains if its name matches one (None: all parameters
            with ``requires_grad``).
        exclude: regular expressions of names never trained.
        masks: optional ``{name: bool tensor}``; only True coordinates are perturbed and updated. They are
            kept bit-packed (1 bit per coordinate, 1/32 of float32 weights).
    """

    def __init__(self, model: nn.Module, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, masks: dict[str, torch.Tensor] | None = None):
        inc = compile_patterns(include, "train_params") if include else None
        exc = compile_patterns(exclude or (), "freeze_params")
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        for name, p in model.named_parameters():
            if inc is not None and not any(r.search(name) for r in inc):
                continue
            if inc is None and not p.requires_grad:
                continue
            if any(r.search(name) for r in exc):
                continue
            self.names.append(name)
            self.params.append(p)
        offloaded = [n for n, p in zip(self.names, self.params) if p.device.type == "meta"]
        if offloaded:
            raise ZolmError(f"{offloaded[0]} is offloaded (meta device): ZO updates need every trainable "
                            "parameter in memory; use a device_map without disk offload")
        if not self.params:
            raise ZolmError(f"no parameter matches include={list(include or [])} exclude={list(exclude or [])}")
        index = {id(p): i for i, p in enumerate(self.params)}
        # (module, attribute) pairs that hold each tensor (two for a tied embedding / head): lean half-precision
        # training swaps a perturbed copy in there for the duration of that module's forward (zolm.zo.precision)
        self.owners: list[list[tuple[nn.Module, str]]] = [[] for _ in self.params]
        for mod in model.modules():
            for attr, t in mod._parameters.items():
                if t is not None and id(t) in index:
                    self.owners[index[id(t)]].append((mod, attr))
        self.masks: list[torch.Tensor | None] = [None] * len(self.params)
        self.mask_counts: list[int | None] = [None] * len(self.params)
        for name, m in (masks or {}).items():
            if name not in self.names:
                raise ZolmError(f"mask for unknown parameter {name!r}")
            i = self.names.index(name)
            if m.shape != self.params[i].shape:
                raise ZolmError(f"mask for {name} has shape {tuple(m.shape)}, parameter {tuple(self.params[i].shape)}")
            self.masks[i] = pack_mask(m.to(device=self.params[i].device, dtype=torch.bool))
            self.mask_counts[i] = int(m.sum())

    def __len__(self) -> int:
        return len(self.params)

    def numel(self) -> int:
        """Number of coordinates that ZO actually moves (masked ones only, where a mask is set)."""
        return sum(p.numel() if c is None else c for p, c in zip(self.params, self.mask_counts))


@torch.no_grad()
def perturb_(params: ParamSet, seed: int, coef: float, sampler: str = "ih4") -> float:
    """theta <- theta + coef * z(seed), in place over every tensor of ``params``; returns the exact coef."""
    applied = 0.0
    for i, (p, m) in enumerate(zip(params.params, params.masks)):
        applied = axpy_z_(p.data, tensor_key(seed, i), coef, sampler, mask=m)
    return applied


def spsa_projected_grad(loss_fn: Callable[[], float], params: ParamSet, seed: int, eps: float,
                        sampler: str = "ih4", restore: bool = True) -> tuple[float, float, float]:
    """Two-point SPSA: returns (projected gradient, L(theta + eps z), L(theta - eps z)).

    Perturbs in place by +eps z, -2 eps z and (if ``restore``) +eps z. In floating point the round trip
    leaves a drift of at most 1.5 ulp(|theta| + 2 eps |z|) per coordinate (three roundings); callers that
    need bit-identical trajectories replay the same sequence of operations (see zolm.zo.replay).
    """
    eps_applied = perturb_(params, seed, eps, sampler)
    lp = loss_fn()
    perturb_(params, seed, -2 * eps, sampler)
    lm = loss_fn()
    if restore:
        perturb_(params, seed, eps, sampler)
    return (lp - lm) / (2 * eps_applied), lp, lm
