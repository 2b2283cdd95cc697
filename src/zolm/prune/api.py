"""``prune_(model, PruneConfig(...), calib)``: the one pruning verb, and its configuration and report.

Methods (``METHODS``):

* ``magnitude``: |W|, unstructured over the whole layer (Wanda's baseline) or per N:M group; no calibration.
* ``wanda``: |W| * ||X_j||, per output row or N:M group (Sun et al. 2024).
* ``sparsegpt``: OBS mask selection and weight reconstruction (Frantar & Alistarh 2023).
* ``wanda++``: regional gradient score, then regional optimisation (Yang et al. 2025); ``ro_rounds=0`` is
  "RGS only". Defaults M = 8 inputs per round at RMSprop lr 2e-4 and re-prune statistics from the RO steps
  (``ro_stats="steps"``): 4.1x Wanda's time at the perplexity of M = 16 / lr 1e-4 (7.6x; docs/results.md).

Embeddings and the LM head are never pruned: only the linear layers inside the decoder blocks are.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from zolm.blocks import BlockInputs, decoder_blocks, find_block_list, linear_layers, out_in
from zolm.errors import ZolmError, unknown
from zolm.prune.calibrate import InputStats, blockwise, forward_all, record_inputs
from zolm.prune.masks import apply_mask_, make_mask, nm_violations, parse_nm, row_sparsity
from zolm.prune.masks import sparsity as zero_fraction
from zolm.prune.regional import wanda_pp_block_
from zolm.prune.scores import magnitude, wanda
from zolm.prune.sparsegpt import SparseGPT

METHODS = {
    "magnitude": "|W|, compared over the whole layer (unstructured) or each N:M group",
    "wanda": "|W| * ||X_j||, compared per output row",
    "sparsegpt": "OBS saliency w^2 / [H^-1]_jj^2 with weight updates",
    "wanda++": "(alpha * G + ||X_j||) * |W| with regional gradients G, then regional optimisation",
}
RO_STATS = {
    "steps": "re-prune statistics recorded during the previous round's RO steps (free)",
    "pass": "re-prune statistics from a forward of the round's inputs (the community reproduction)",
}
PAPER_RO_LR = 3e-7  # Wanda++'s RMSprop lr for LLaMA-7B
DEFAULT_RO_LR = 2e-4  # re-tuned for SmolLM2-135M with M = 8 (1e-4 with M = 16; docs/pruning.md, docs/results.md)


@dataclass
class PruneConfig:
    """What to prune and how. Validated on construction; every error is one line.

    Give either ``sparsity`` (unstructured ratio in [0, 1)) or ``nm`` ("2:4": keep 2 of every 4 consecutive
    input weights), not both; neither means 50% unstructured.
    """

    method: str = "wanda"
    sparsity: float | None = None
    nm: str | None = None
    alpha: float = 100.0  # Wanda++: weight of the regional gradient term
    ro_rounds: int = 5  # Wanda++: regional optimisation rounds K (0 = RGS only)
    ro_samples: int = 8  # Wanda++: inputs drawn per round M, one RMSprop step each (paper: 32 of 128; CPU: 8-16)
    ro_lr: float = DEFAULT_RO_LR  # Wanda++: RMSprop learning rate
    ro_stats: str = "steps"  # Wanda++: re-prune ||X_j|| from the last round's RO steps, or "pass" (M forwards)
    ro_log_errors: bool = False  # Wanda++: also log each round's error before/after its steps (2 forwards of M)
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    damp: float = 0.01  # SparseGPT: lambda = damp * mean(diag H)
    batch_size: int = 8  # sequences per block forward
    seed: int = 0  # draws of RO inputs
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise unknown("pruning method", self.method, METHODS)
        if self.nm is not None and self.sparsity is not None:
            raise ZolmError("give either a sparsity or an N:M pattern, not both")
        if self.nm is not None:
            self.nm = "{}:{}".format(*parse_nm(self.nm))
        else:
            self.sparsity = 0.5 if self.sparsity is None else self.sparsity
            if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1 \
                    or math.isnan(self.sparsity):
                raise ZolmError(f"sparsity must be in [0, 1), got {self.sparsity}")
            self.sparsity = float(self.sparsity)
        for name, low in (("ro_rounds", 0), ("ro_samples", 1), ("blocksize", 1), ("batch_size", 1)):
            if int(getattr(self, name)) < low:
                raise ZolmError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("alpha", "ro_lr", "damp"):
            if not getattr(self, name) >= 0:
                raise ZolmError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ro_stats not in RO_STATS:
            raise unknown("ro_stats", self.ro_stats, RO_STATS)
        if self.nm is not None and self.blocksize % self.pattern[1]:
            raise ZolmError(f"blocksize {self.blocksize} must be a multiple of M in {self.nm}")

    @property
    def pattern(self) -> tuple[int, int] | None:
        """``(n, m)`` for N:M sparsity, else None."""
        return parse_nm(self.nm) if self.nm is not None else None

    @property
    def target(self) -> float:
        """The fraction of each pruned layer's weights that become zero."""
        if self.nm is None:
            return float(self.sparsity)
        n, m = self.pattern
        return 1 - n / m

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    def describe(self) -> str:
        return f"{self.method} {self.nm or f'{self.target:.0%} unstructured'}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerReport:
    name: str  # qualified name, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]  # [out, in]
    sparsity: float  # achieved fraction of zeros
    min_row_sparsity: float
    max_row_sparsity: float
    nm_violations: int | None = None  # groups with more than N non-zeros (N:M only)


@dataclass
class BlockReport:
    index: int
    seconds: float
    rel_error: float | None  # ||Y_pruned - Y_dense||^2 / ||Y_dense||^2 on the block's calibration inputs
    layers: list[LayerReport]
    details: dict = field(default_factory=dict)  # per-method extras (Wanda++: ratios, RO log)


@dataclass
class PruneReport:
    config: dict
    blocks: list[BlockReport]
    seconds: float  # total wall time, calibration capture included
    sparsity: float  # zeros / weights over all pruned layers
    params_pruned: int  # weights in pruned layers

    def layers(self) -> list[LayerReport]:
        return [layer for b in self.blocks for layer in b.layers]

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_report(name: str, layer: nn.Module, nm: tuple[int, int] | None) -> LayerReport:
    w = out_in(layer).detach()
    rows = row_sparsity(w)
    return LayerReport(name, (int(w.shape[0]), int(w.shape[1])), zero_fraction(w), float(rows.min()),
                       float(rows.max()), None if nm is None else nm_violations(w, *nm))


def _wanda_block_(cfg: PruneConfig, block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs,
                  dense: torch.Tensor) -> dict:
    stats = {n: InputStats(out_in(m).shape[1], m.weight.device) for n, m in layers.items()}
    with record_inputs(layers, stats):
        forward_all(block, inputs, cfg.batch_size, out=dense)
    for name, layer in layers.items():
        w = out_in(layer)
        apply_mask_(w, make_mask(wanda(w, stats[name].norm()), cfg.target, cfg.pattern, "row"))
    return {}


def _sparsegpt_block_(cfg: PruneConfig, block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs,
                      dense: torch.Tensor) -> dict:
    solvers = {n: SparseGPT(m) for n, m in layers.items()}
    with record_inputs(layers, solvers):
        forward_all(block, inputs, cfg.batch_size, out=dense)
    errors = {}
    for name, solver in solvers.items():
        errors[name] = solver.prune(cfg.target, cfg.pattern, cfg.blocksize, cfg.damp)
        solver.free()
    return {"obs_error": errors}


def _wanda_pp_block_(cfg: PruneConfig, generator: torch.Generator, block: nn.Module, layers: dict[str, nn.Module],
                     inputs: BlockInputs, dense: torch.Tensor) -> dict:
    return wanda_pp_block_(block, layers, inputs, dense, sparsity=cfg.target, nm=cfg.pattern, alpha=cfg.alpha,
                           rounds=cfg.ro_rounds, samples=cfg.ro_samples, lr=cfg.ro_lr, generator=generator,
                           batch_size=cfg.batch_size, restats=cfg.ro_stats, log_errors=cfg.ro_log_errors)


@torch.no_grad()
def _magnitude_(model: nn.Module, cfg: PruneConfig) -> list[BlockReport]:
    prefix, blocks = find_block_list(model)
    reports = []
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        layers = linear_layers(block)
        for layer in layers.values():
            w = out_in(layer)
            apply_mask_(w, make_mask(magnitude(w), cfg.target, cfg.pattern, "layer"))
        reports.append(BlockReport(i, time.perf_counter() - t0, None,
                                   [_layer_report(f"{prefix}.{i}.{n}", m, cfg.pattern) for n, m in layers.items()]))
    return reports


def prune_(model: nn.Module, config: PruneConfig, calib: torch.Tensor | None = None) -> PruneReport:
    """Prune the linear layers of ``model``'s decoder blocks in place.

    Args:
        model: a decoder-only ``transformers`` model (blocks found by ``zolm.blocks.decoder_blocks``).
        config: the method and pattern.
        calib: calibration token ids [N, L] (``zolm.data.calibration.calibration_ids``); not needed for magnitude.

    Returns:
        A :class:`PruneReport` with the achieved sparsity of every layer, per-block reconstruction errors and
        wall times.
    """
    decoder_blocks(model)  # a clear error before any work if the model has no findable blocks
    if config.nm is not None:
        n, m = config.pattern
        for block in decoder_blocks(model)[:1]:
            for name, layer in linear_layers(block).items():
                if out_in(layer).shape[1] % m:
                    raise ZolmError(f"N:M {config.nm}: layer {name} has {out_in(layer).shape[1]} inputs, "
                                    f"not a multiple of {m}")
    t0 = time.perf_counter()
    if not config.needs_calibration:
        blocks = _magnitude_(model, config)
    else:
        if calib is None or calib.dim() != 2 or calib.numel() == 0:
            raise ZolmError(f"method {config.method} needs calibration token ids [N, L]")
        generator = torch.Generator().manual_seed(config.seed)
        step = {"wanda": lambda *a: _wanda_block_(config, *a), "sparsegpt": lambda *a: _sparsegpt_block_(config, *a),
                "wanda++": lambda *a: _wanda_pp_block_(config, generator, *a)}[config.method]

        def process(index: int, name: str, block: nn.Module, inputs: BlockInputs, dense: torch.Tensor) -> dict:
            return step(block, linear_layers(block), inputs, dense)

        results = blockwise(model, calib, process, config.batch_size, desc=f"prune {config.method}")
        blocks = [BlockReport(r.index, r.seconds, r.rel_error,
                              [_layer_report(f"{r.name}.{n}", m, config.pattern)
                               for n, m in linear_layers(decoder_blocks(model)[r.index]).items()], r.info)
                  for r in results]
    total = sum(lay.shape[0] * lay.shape[1] for b in blocks for lay in b.layers)
    zeros = sum(lay.sparsity * lay.shape[0] * lay.shape[1] for b in blocks for lay in b.layers)
    return PruneReport(config.to_dict(), blocks, time.perf_counter() - t0, zeros / max(1, total), total)
