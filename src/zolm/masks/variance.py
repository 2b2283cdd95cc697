"""How far a one-query SPSA estimate is from the true gradient, with and without a mask (papers.md 9.2).

For perturbation seeds s_1..s_n at a fixed theta and batch, with the true gradient g (backprop) and an update
mask U (all ones for MeZO):

    g_hat_s = mu_s * (z_s * U),     mu_s = (L(theta + eps z_s * P) - L(theta - eps z_s * P)) / (2 eps)

where P is the perturbation mask (P = U for MaZO; P = 1 with U != 1 is the "mask the update only" ablation of
papers.md 5.4, which does not lower the variance). Reported over the seeds, against the target t = U * g:

* ``rel_mse``   mean ||g_hat - t||^2 / ||t||^2   (~ d_eff + 0.7 for ih4 z: MeZO Lemma 2, n = 1);
* ``cos_target`` / ``cos_full``  mean cosine of g_hat with t and with the full gradient (~ sqrt(2 / (pi d_eff))
  times ||t|| / ||g|| for the latter);
* ``mass``      ||t||^2 / ||g||^2, the share of the squared gradient the mask keeps;
* ``fd_rel_err`` median |mu - z.U.g| / |z.U.g| (finite-difference error of mu; only when P = U).

z is regenerated exactly as training draws it (:mod:`zolm.zo.rng`), per tensor, so no dense copy is kept.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from zolm.zo.rng import draw, tensor_key, unpack_mask
from zolm.zo.spsa import ParamSet, spsa_projected_grad


def projected_grads(loss_fn: Callable[[], float], params: ParamSet, seeds: list[int], eps: float = 1e-3,
                    sampler: str = "ih4") -> list[float]:
    """mu_s for each seed (perturbing ``params`` under their masks, restoring after each; restore drift of a few
    ulp per seed is left in place)."""
    return [spsa_projected_grad(loss_fn, params, s, eps, sampler)[0] for s in seeds]


@torch.no_grad()
def estimator_stats(mus: list[float], seeds: list[int], params: ParamSet, grads: dict[str, torch.Tensor],
                    update: dict[str, torch.Tensor] | None = None, full_sq: float | None = None,
                    sampler: str = "ih4", same_mask: bool = True) -> dict:
    """Statistics of g_hat_s = mu_s (z_s * U) against U * g (see module docstring).

    Args:
        mus, seeds: projected gradients and the seeds they were measured with on ``params``.
        params: the ParamSet the mus were measured on (fixes each tensor's z stream by its index).
        grads: true gradient of every tensor of ``params`` (by name; full shape).
        update: U by name (bool); None = ``params``' own masks (all ones where it has none). Tensors of
            ``params`` absent from a given dict are not updated (U = 0).
        full_sq: ||g||^2 of the full gradient the cosine ``cos_full`` refers to (default: over ``params``).
        same_mask: whether P = U (then the finite-difference error of mu is reported).
    """
    masks: list[torch.Tensor | None] = []  # U per tensor; None = all ones
    used: list[bool] = []  # False: U = 0 (the tensor is not updated)
    for i, (name, p) in enumerate(zip(params.names, params.params)):
        if update is None:
            m = params.masks[i]
            masks.append(None if m is None else unpack_mask(m, p.numel()).view(p.shape))
        else:
            masks.append(update[name].to(p.device) if name in update else None)
        used.append(update is None or name in update)
    t_sq, g_sq, d_eff = 0.0, 0.0, 0
    for name, p, m, u in zip(params.names, params.params, masks, used):
        g = grads[name].float()
        g_sq += float((g * g).sum(dtype=torch.float64))
        if not u:
            continue
        t = g if m is None else g * m
        t_sq += float((t * t).sum(dtype=torch.float64))
        d_eff += p.numel() if m is None else int(m.sum())
    full_sq = g_sq if full_sq is None else full_sq
    rows = []
    for mu, seed in zip(mus, seeds):
        a = b = 0.0
        for i, (name, p, m, u) in enumerate(zip(params.names, params.params, masks, used)):
            if not u:
                continue
            z = draw(p.numel(), tensor_key(seed, i), sampler, device=p.device).view(p.shape)
            if m is not None:
                z = z * m
            a += float((z * grads[name].float()).sum(dtype=torch.float64))
            b += float((z * z).sum(dtype=torch.float64))
        err = mu * mu * b - 2 * mu * a + t_sq
        sign = math.copysign(1.0, mu) if mu else 0.0
        rows.append({"err": err, "cos_t": sign * a / math.sqrt(max(b * t_sq, 1e-300)),
                     "cos_f": sign * a / math.sqrt(max(b * full_sq, 1e-300)),
                     "fd": abs(mu - a) / max(abs(a), 1e-30)})
    out = {"seeds": len(rows), "d_eff": d_eff, "mass": t_sq / max(full_sq, 1e-300),
           "rel_mse": statistics.fmean(r["err"] for r in rows) / max(t_sq, 1e-300),
           "cos_target": statistics.fmean(r["cos_t"] for r in rows),
           "cos_target_sd": statistics.pstdev(r["cos_t"] for r in rows),
           "cos_full": statistics.fmean(r["cos_f"] for r in rows),
           "theory_abs_cos": math.sqrt(2 / (math.pi * max(d_eff, 1)))}
    if same_mask:
        out["fd_rel_err"] = statistics.median(r["fd"] for r in rows)
    return out
