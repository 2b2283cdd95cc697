"""Wanda++ (Yang et al. 2025): regional gradients and regional optimisation of one decoder block.

"Regional" means confined to one decoder block f^l: no LM loss, no backpropagation through the rest of the model.

* Regional gradient score (Sec. 3.1): with the block's inputs X_n (n = 1..N calibration sequences),
  G_ij = sqrt((1/N) sum_n (d ||f^l(X_n)||_2 / dW_ij)^2), one backward per sequence, accumulated in float32.
  The pruning score is S_ij = (alpha * G_ij + ||X_j||_2) * |W_ij|, compared per output row (or per N:M group).
* Regional optimisation (Sec. 3.2): K rounds; each round re-prunes the block with that score, draws M of the N
  inputs and takes one RMSprop step per drawn input on sum ||f^l_dense(X_m) - f^l(X_m)||^2 over the block's
  linear weights (float32). The targets are the dense block's outputs on the same, pruned-upstream inputs,
  computed once by the dense pass. RO may revive pruned weights; a final prune on all N inputs restores the
  exact pattern. A round's re-prune takes ||X_j|| from the previous round's RO forwards (no extra pass).

Cost per block, in forwards of one sequence (f) and RO / RGS steps (forward + backward, ~3 f): RGS N steps (also
the dense outputs and first statistics), RO K * M steps, final statistics N f, propagation N f; Wanda: 2 N f.

Logged for free (papers.md 8.5: RO must reduce the block error; if it does not, the learning rate is wrong for
the model): each round's relative training loss and the error after RO on all N inputs; ``log_errors`` adds
the error on the round's M inputs before and after its steps (two more forwards of M per round).
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
                  indices: list[int] | None = None, reference: torch.Tensor | None = None
                  ) -> tuple[dict[str, InputStats], float | None]:
    """||X_j||^2 statistics of every layer, from running the block (as it is now) on the given inputs, and (with
    ``reference``) the block's relative output error on them, from the same forward."""
    stats = _stats(layers)
    with record_inputs(layers, stats):
        err = forward_all(block, inputs, batch_size, reference=reference, indices=indices)
    return stats, err


def optimize_round_(block: nn.Module, weights: list[nn.Parameter], inputs: BlockInputs, targets: torch.Tensor,
                    indices: list[int], optimizer: torch.optim.Optimizer) -> float:
    """One RO round: for each drawn input, one optimizer step on ||f(X_m) - target_m||^2 (sum over entries).

    Returns the round's relative training loss, sum_m loss_m / sum_m ||target_m||^2 with each loss_m taken before
    its own step (free: the steps compute it anyway).
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=targets.device)
    ref_sum = torch.zeros((), dtype=torch.float64, device=targets.device)
    with _grad_only(block, weights):
        for i in indices:
            optimizer.zero_grad(set_to_none=True)
            y = run_block(block, inputs, inputs.hidden[i:i + 1])
            t = targets[i:i + 1].float()
            loss = (y.float() - t).pow(2).sum()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double()
            ref_sum += t.pow(2).sum().double()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_sum / ref_sum.clamp(min=1e-30))


def wanda_pp_block_(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, dense_out: torch.Tensor, *,
                    sparsity: float, nm: tuple[int, int] | None, alpha: float, rounds: int, samples: int,
                    lr: float, generator: torch.Generator, batch_size: int, restats: str = "steps",
                    log_errors: bool = False) -> dict:
    """Wanda++ on one block, in place (papers.md 8.4). Returns the per-layer gradient/norm ratios and RO log.

    ``rounds = 0`` is "RGS only": one prune with the regional gradient score, no optimisation.
    ``restats`` says where a round's re-prune takes ||X_j|| from: ``"steps"`` (default) records it during the
    previous round's RO steps (the forward of each step, at the weights of that step; free), ``"pass"`` runs
    the current block on the round's own M inputs first (the community reproduction; one forward of M more).
    Every forward serves the algorithm; the log takes only what those forwards give: per round the relative
    training loss (``rel_loss``), and the error on all N inputs after RO, before the final prune
    (``rel_error_ro``, from the final statistics pass). ``log_errors`` adds two diagnostic passes per round
    (``rel_error_before`` / ``rel_error_after``: the error on the round's inputs around its steps); they do
    not change the result.
    """
    stats = _stats(layers)
    with record_inputs(layers, stats):  # dense pass: input norms, regional gradients and dense outputs at once
        if alpha == 0:  # the score is Wanda's: G is not needed, so no backward (0 * G adds exactly nothing)
            forward_all(block, inputs, batch_size, out=dense_out)
            grads = {n: torch.zeros((), device=m.weight.device) for n, m in layers.items()}
        else:
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
        step_stats: dict[str, InputStats] = {}
        for k in range(rounds):
            idx = torch.randperm(len(inputs), generator=generator)[:m].tolist()
            if k > 0:  # re-prune with statistics of the current block (RO revived some pruned weights)
                if restats == "pass":
                    step_stats = collect_stats(block, layers, work, batch_size, idx)[0]
                prune_rgs_(layers, step_stats, grads, alpha, sparsity, nm)
            entry: dict = {"round": k + 1}
            if log_errors:
                entry["rel_error_before"] = forward_all(block, work, batch_size, reference=dense_out, indices=idx)
            record = restats == "steps" and k + 1 < rounds  # the next round re-prunes from these steps' inputs
            if record:
                step_stats = _stats(layers)
            with record_inputs(layers, step_stats) if record else contextlib.nullcontext():
                entry["rel_loss"] = optimize_round_(block, weights, work, dense_out, idx, optimizer)
            if log_errors:
                entry["rel_error_after"] = forward_all(block, work, batch_size, reference=dense_out, indices=idx)
            log.append(entry)
        final, err = collect_stats(block, layers, work, batch_size, reference=dense_out)
        prune_rgs_(layers, final, grads, alpha, sparsity, nm)  # the exact pattern again
    finally:
        block.to(dtype)
    return {"grad_norm_ratio": ratios, "ro": log, "rel_error_ro": err}
