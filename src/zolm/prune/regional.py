"""Wanda++ (Yang et al. 2025): regional gradients and regional optimisation of one decoder block.

"Regional" means confined to one decoder block f^l: no LM loss, no backpropagation through the rest of the model.

* Regional gradient score (Sec. 3.1): with the block's inputs X_n (n = 1..N calibration sequences),
  G_ij = sqrt((1/N) sum_n (d ||f^l(X_n)||_2 / dW_ij)^2), one backward per sequence, accumulated in float32.
  The pruning score is S_ij = (alpha * G_ij + ||X_j||_2) * |W_ij|, compared per output row (or per N:M group).
* Regional optimisation (Sec. 3.2): K rounds; each round re-prunes the block with that score, draws M of the N
  inputs and takes one RMSprop step per drawn input on sum ||f^l_dense(X_m) - f^l(X_m)||^2 over the block's
  linear weights (float32). The targets are the dense block's outputs on the same, pruned-upstream inputs.
  RO may revive pruned weights; a final prune on all N inputs restores the exact pattern.

The relative error of the block on the round's M inputs is logged before and after each round's steps
(papers.md 8.5: RO must reduce it; if it does not, the learning rate is wrong for the model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from zolm.blocks import BlockInputs, out_in, run_block
from zolm.prune.calibrate import InputStats, forward_all, record_inputs
from zolm.prune.masks import apply_mask_, make_mask
from zolm.prune.scores import grad_to_norm_ratio, wanda_pp


@contextlib.contextmanager
def _grad_only(block: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, only ``params`` require grad (restored on exit); autograd is on."""
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def regional_gradients(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs,
                       dense_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """G for every layer ([out, in], float32): RMS over sequences of d||f(X_n)||_2 / dW (not squared, no labels).

    Also writes the block's outputs into ``dense_out`` (if given): the same forward serves as the dense pass.
    Any ``record_inputs`` hooks active around this call see every sequence once.
    """
    names = list(layers)
    weights = [layers[n].weight for n in names]
    sq = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in zip(names, weights)}
    with _grad_only(block, weights):
        for i in range(len(inputs)):
            y = run_block(block, inputs, inputs.hidden[i:i + 1])
            grads = torch.autograd.grad(y.float().norm(), weights)
            for n, g in zip(names, grads):
                sq[n] += g.float().pow(2)
            if dense_out is not None:
                dense_out[i] = y.detach()[0].to(dense_out.dtype)
    return {n: out_in(layers[n], (sq[n] / len(inputs)).sqrt()) for n in names}


def prune_rgs_(layers: dict[str, nn.Module], stats: dict[str, InputStats], grads: dict[str, torch.Tensor],
               alpha: float, sparsity: float, nm: tuple[int, int] | None) -> None:
    """Prune every layer in place with S = (alpha * G + ||X_j||) * |W|, per row (or N:M group)."""
    for name, layer in layers.items():
        w = out_in(layer)
        apply_mask_(w, make_mask(wanda_pp(w, stats[name].norm(), grads[name], alpha), sparsity, nm, "row"))


def _stats(layers: dict[str, nn.Module]) -> dict[str, InputStats]:
    return {n: InputStats(out_in(m).shape[1], m.weight.device) for n, m in layers.items()}


def collect_stats(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, batch_size: int,
                  indices: list[int] | None = None) -> dict[str, InputStats]:
    """||X_j||^2 statistics of every layer, from running the block (as it is now) on the given inputs."""
    stats = _stats(layers)
    with record_inputs(layers, stats):
        forward_all(block, inputs, batch_size, indices=indices)
    return stats


def optimize_round_(block: nn.Module, weights: list[nn.Parameter], inputs: BlockInputs, targets: torch.Tensor,
                    indices: list[int], optimizer: torch.optim.Optimizer) -> None:
    """One RO round: for each drawn input, one optimizer step on ||f(X_m) - target_m||^2 (sum over entries)."""
    with _grad_only(block, weights):
        for i in indices:
            optimizer.zero_grad(set_to_none=True)
            y = run_block(block, inputs, inputs.hidden[i:i + 1])
            loss = (y.float() - targets[i:i + 1].float()).pow(2).sum()
            loss.backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def wanda_pp_block_(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, dense_out: torch.Tensor, *,
                    sparsity: float, nm: tuple[int, int] | None, alpha: float, rounds: int, samples: int,
                    lr: float, generator: torch.Generator, batch_size: int) -> dict:
    """Wanda++ on one block, in place (papers.md 8.4). Returns the per-layer gradient/norm ratios and RO log.

    ``rounds = 0`` is "RGS only": one prune with the regional gradient score, no optimisation.
    """
    stats = _stats(layers)
    with record_inputs(layers, stats):  # dense pass: input norms, regional gradients and dense outputs at once
        grads = regional_gradients(block, layers, inputs, dense_out)
    ratios = {n: grad_to_norm_ratio(stats[n].norm(), grads[n], alpha) for n in layers}
    prune_rgs_(layers, stats, grads, alpha, sparsity, nm)
    log: list[dict] = []
    if rounds == 0:
        return {"grad_norm_ratio": ratios, "ro": log}
    dtype = next(block.parameters()).dtype
    work = inputs if dtype == torch.float32 else inputs.cast(torch.float32)
    block.float()  # RO in float32: steps of ~1e-6 vanish below half-precision resolution (papers.md 8.5)
    try:
        weights = [m.weight for m in layers.values()]
        optimizer = torch.optim.RMSprop(weights, lr=lr)
        m = min(samples, len(inputs))
        for k in range(rounds):
            idx = torch.randperm(len(inputs), generator=generator)[:m].tolist()
            if k > 0:  # re-prune: statistics of the current block on this round's inputs
                prune_rgs_(layers, collect_stats(block, layers, work, batch_size, idx), grads, alpha, sparsity, nm)
            before = forward_all(block, work, batch_size, reference=dense_out, indices=idx)
            optimize_round_(block, weights, work, dense_out, idx, optimizer)
            after = forward_all(block, work, batch_size, reference=dense_out, indices=idx)
            log.append({"round": k + 1, "rel_error_before": before, "rel_error_after": after})
        prune_rgs_(layers, collect_stats(block, layers, work, batch_size), grads, alpha, sparsity, nm)  # final
    finally:
        block.to(dtype)
    return {"grad_norm_ratio": ratios, "ro": log}
