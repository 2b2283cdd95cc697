"""How a ZO step moves its tensors, by storage dtype: in place, on float32 master copies, or virtually.

float32 / float64 tensors are always moved in place (MeZO's seed trick): +eps z, -2 eps z, then one pass that
restores (+eps z) and steps (-lr g z) as two separately exact coefficients (zolm.zo.rng.axpy_z_).

bfloat16 / float16 tensors follow ``half_mode``:

``exact`` (default)  a float32 master copy m of each half tensor. The forwards see half(m +- eps z), written
                     from m (m never moves while perturbed); the update is m <- m (1 - lr wd) - lr g z in
                     float32 and the weights become half(m). The walk is float32's: error / update RMS as in
                     float32. Cost: 4 bytes per trained half coordinate (2x a bf16 model when all of it
                     trains; little with LoRA, TT adapters or a few tensors).
``lean``             no copy. The forwards perturb virtually: a forward pre-hook swaps half(W +- eps z) in for
                     the duration of its module's forward (one layer's weight at a time), so the stored W never
                     moves and needs no restore; the update rounds W - lr g z stochastically into the storage
                     dtype with a counter-based rounding stream (unbiased and replayable). Cost: no memory;
                     the walk carries the rounding noise, ~ulp(W) / 2 per coordinate per step (measured in
                     benchmarks/zo_step.py).
``inplace``          what float32 does, in half precision: every perturb, restore and update rounds to nearest
                     into the storage dtype. Updates below half an ulp are dropped; zolm warns once.
"""

from __future__ import annotations

import logging

import torch

from zolm.errors import ZolmError, unknown
from zolm.utils.sparse import unpack_mask
from zolm.zo.halfprec import HALF_DTYPES, master_step_, perturb_half_, sr_step_
from zolm.zo.rng import SAMPLERS, axpy_z_, derive_seed, draw, round_coef, tensor_key

log = logging.getLogger(__name__)

HALF_MODES = ("exact", "lean", "inplace")
STREAM_SR = 0xD  # lean mode's rounding stream (QuZO uses 0xA..0xC)
MASTER_SUFFIX = "@zo_master"


def sr_key(seed: int, index: int) -> tuple[int, int]:
    """Key of the stochastic-rounding stream of tensor ``index`` under step ``seed``."""
    return tensor_key(derive_seed(seed, STREAM_SR), index)


def check_half_mode(mode: str) -> str:
    if mode not in HALF_MODES:
        raise unknown("half_mode", mode, HALF_MODES)
    return mode


def rounds_away(p: torch.Tensor, coef: float, sampler: str, sample: int = 1 << 16) -> float:
    """Share of the first ``sample`` coordinates of half ``p`` whose update |coef z| is below half an ulp."""
    n = min(sample, p.numel())
    h = p.detach().reshape(-1)[:n].cpu()
    ulp = torch.nextafter(h, torch.full_like(h, float("inf"))).float() - h.float()
    step = (coef * draw(n, (1, 2), sampler)).abs()
    return float((step < 0.5 * ulp.abs()).float().mean())


class WeightStore:
    """The tensors of a ParamSet and how ZO moves them (see the module docstring)."""

    def __init__(self, params, half_mode: str = "exact", sampler: str = "ih4"):
        self.params = params
        self.sampler = sampler
        self.std = SAMPLERS[sampler][1]
        check_half_mode(half_mode)
        self.kinds = [half_mode if p.dtype in HALF_DTYPES else "inplace" for p in params.params]
        self.masters: dict[int, torch.Tensor] = {
            i: p.detach().float().contiguous().clone() for i, (p, k) in enumerate(zip(params.params, self.kinds))
            if k == "exact"}
        self._seed: int | None = None
        self._acc = 0.0
        self._swapped: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        self._hooks: list = []
        self._seen: set[int] = set()
        self._checked = False
        self._warned = False  # the in-place rounding check ran
        if "lean" in self.kinds:
            self._install_hooks()

    # ------------------------------------------------------------------ state
    def master_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.masters.values())

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold besides the weights: the float32 masters (exact mode)."""
        return {self.params.names[i] + MASTER_SUFFIX: m for i, m in self.masters.items()}

    # ------------------------------------------------------------------ lean mode's virtual perturbation
    def _install_hooks(self) -> None:
        owned: dict[torch.nn.Module, list[tuple[int, str]]] = {}
        for i, (kind, owners) in enumerate(zip(self.kinds, self.params.owners)):
            if kind == "lean":
                for mod, attr in owners:
                    owned.setdefault(mod, []).append((i, attr))
        for mod, items in owned.items():
            self._hooks.append(mod.register_forward_pre_hook(self._pre_hook(items)))
            self._hooks.append(mod.register_forward_hook(self._post_hook(mod)))

    def _pre_hook(self, items: list[tuple[int, str]]):
        def hook(mod, args):
            if self._seed is None or self._acc == 0.0:
                return
            for i, attr in items:
                orig = mod._parameters[attr]
                buf = torch.empty_like(orig)
                perturb_half_(buf, orig, tensor_key(self._seed, i), self._acc, self.sampler, self.params.masks[i])
                mod._parameters[attr] = buf  # the Parameter object is untouched; put back after the forward
                self._swapped.append((mod, attr, orig))
                self._seen.add(i)
        return hook

    def _post_hook(self, mod):
        def hook(module, args, output):
            self._unswap(mod)
        return hook

    def _unswap(self, only=None) -> None:
        keep = []
        for mod, attr, orig in self._swapped:
            if only is None or mod is only:
                mod._parameters[attr] = orig
            else:
                keep.append((mod, attr, orig))
        self._swapped = keep

    def close(self) -> None:
        """Remove lean mode's hooks (the weights are never left perturbed)."""
        self._unswap()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ the two operations of a ZO step
    @torch.no_grad()
    def apply_(self, seed: int, coef: float) -> float:
        """theta <- theta + coef z(seed), incrementally (virtual for lean tensors); returns the applied coef."""
        self._unswap()
        if seed != self._seed:
            self._seed, self._acc = seed, 0.0
        self._acc += coef
        p_set = self.params
        for i, (p, kind) in enumerate(zip(p_set.params, self.kinds)):
            key = tensor_key(seed, i)
            if kind == "inplace":
                axpy_z_(p.data, key, coef, self.sampler, mask=p_set.masks[i])
            elif kind == "exact":
                if self._acc == 0.0:
                    p.data.copy_(self.masters[i])
                else:
                    perturb_half_(p.data, self.masters[i], key, self._acc, self.sampler, p_set.masks[i])
        return round_coef(coef / self.std) * self.std

    @torch.no_grad()
    def update_(self, seeds: list[int], coefs: list[float], weight_decay: float, lr: float,
                decay: list[bool]) -> None:
        """theta <- theta + sum_q coefs[q] z(seeds[q]) with decoupled decay (1 - lr wd) where ``decay``.

        Called with theta perturbed by ``self._acc`` z(seeds[-1]) (in place tensors are restored in the same
        pass as their step); afterwards no tensor is perturbed.
        """
        self._unswap()
        if self._seed is not None and self._acc != 0.0 and self._seed != seeds[-1]:
            raise ZolmError("internal: the update's last seed is not the one currently applied")
        restore = -self._acc
        mult = 1.0 - lr * weight_decay
        p_set, last = self.params, len(seeds) - 1
        for i, (p, kind) in enumerate(zip(p_set.params, self.kinds)):
            m = p_set.masks[i]
            first_mult = mult if (weight_decay and decay[i]) else 1.0
            if kind == "inplace":
                self._warn_inplace(p, coefs)
                for q, (seed, c) in enumerate(zip(seeds, coefs)):
                    if q == last:
                        axpy_z_(p.data, tensor_key(seed, i), restore, self.sampler, mask=m, then=c)
                    else:
                        axpy_z_(p.data, tensor_key(seed, i), c, self.sampler, mask=m)
                if first_mult != 1.0:  # decoupled decay, inside the mask if the tensor has one
                    if m is None:
                        p.data.mul_(first_mult)
                    else:
                        keep = unpack_mask(m, p.numel()).view(p.shape)
                        p.data.copy_(torch.where(keep, p.data * first_mult, p.data))
            elif kind == "exact":
                for q, (seed, c) in enumerate(zip(seeds, coefs)):
                    master_step_(self.masters[i], p.data if q == last else None, tensor_key(seed, i), c,
                                 self.sampler, m, first_mult if q == 0 else 1.0)
            else:
                for q, (seed, c) in enumerate(zip(seeds, coefs)):
                    sr_step_(p.data, tensor_key(seed, i), sr_key(seed, i), c, self.sampler, m,
                             first_mult if q == 0 else 1.0)
        self._seed, self._acc = None, 0.0

    def check_forward(self) -> None:
        """Called after the first perturbed forward: every lean tensor was perturbed by its module's forward
        (else its projected gradient would silently be 0). Checked once."""
        if self._checked or "lean" not in self.kinds:
            return
        self._checked = True
        missed = [n for i, (n, k) in enumerate(zip(self.params.names, self.kinds))
                  if k == "lean" and i not in self._seen]
        if missed and self._seen:
            raise ZolmError(f"half_mode lean cannot perturb {missed[0]} (not used inside its own module's forward); "
                            "use half_mode exact")
        if missed:  # nothing was perturbed: the loss did not run the model's modules (a synthetic loss?)
            log.warning("zolm: half_mode lean: the loss's forward perturbed no trained tensor; if the loss uses the "
                        "model, use half_mode exact")

    def _warn_inplace(self, p: torch.Tensor, coefs: list[float]) -> None:
        """At the first update of a half tensor kept in place: warn if most of its updates round away.
        Sampled once, not every step (the sample costs a draw and a nextafter over 64K coordinates)."""
        if self._warned or p.dtype not in HALF_DTYPES or not coefs:
            return
        self._warned = True
        share = rounds_away(p, max(abs(c) for c in coefs), self.sampler)
        if share > 0.5:
            log.warning("zolm: %.0f%% of this step's %s updates are below half an ulp and round away in half_mode "
                        "inplace; use half_mode exact (float32 masters) or lean (stochastic rounding)",
                        100 * share, str(p.dtype).replace("torch.", ""))
