"""Calibration statistics and the one block-sequential loop every calibrated pruning method shares.

The loop (Wanda's and SparseGPT's "sequential" flow, Sun et al. 2024 Sec. 3; Frantar & Alistarh 2023 Sec. 4):

1. capture the inputs of block 0 for the N calibration sequences (``zolm.blocks.capture_block_inputs``);
2. for each block l: the method runs the *dense* block on its inputs with hooks on the block's linear layers
   (streaming statistics of their inputs: ||X_j||^2 for Wanda, X^T X for SparseGPT), keeps the dense outputs,
   and prunes the block in place (Wanda++ also optimises it);
3. the *pruned* block runs on the same inputs; its outputs overwrite the inputs buffer and feed block l + 1.
   With a model sharded over devices (``device_map``) both buffers move to block l's device before step 2,
   so every statistic, output and error of a block is computed where its weights are.
   Their distance to the dense outputs, ||Y_pruned - Y_dense||^2 / ||Y_dense||^2, is the block's reported
   reconstruction error (the quantity Wanda++'s regional optimisation minimises).

Memory: the model, two [N, L, H] buffers (inputs/outputs and dense outputs) and one block's working set for a
micro-batch. Activations of other blocks are never held.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from zolm.blocks import BlockInputs, capture_block_inputs, find_block_list, run_block
from zolm.errors import ZolmError
from zolm.utils.devices import module_device
from zolm.utils.log import progress


class Collector(Protocol):
    def add_batch(self, x: torch.Tensor) -> None: ...


def _num_sequences(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() >= 3 else 1


class InputStats:
    """Streaming squared L2 norm of each input feature of one linear layer (Wanda's ``scaler_row``).

    ``norm()`` = sqrt((1/N) sum_{sequences, tokens} x_j^2) with N the number of sequences seen: Wanda's
    normalisation, which Wanda++'s alpha = 100 is calibrated against (papers.md 8.2). Sums are kept in float64.
    """

    def __init__(self, d_in: int, device: torch.device | str = "cpu"):
        self.sq = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.nseq = 0

    def add_batch(self, x: torch.Tensor) -> None:
        self.nseq += _num_sequences(x)
        self.sq += x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0).double()

    def norm(self) -> torch.Tensor:
        """||X_j||_2 as Wanda normalises it ([in], float32)."""
        return (self.sq / max(1, self.nseq)).sqrt().float()


@contextlib.contextmanager
def record_inputs(layers: dict[str, nn.Module], collectors: dict[str, Collector]) -> Iterator[None]:
    """While active, every forward of ``layers[name]`` passes its input to ``collectors[name].add_batch``."""
    handles = []
    for name, layer in layers.items():
        sink = collectors[name]

        def hook(_module: nn.Module, args: tuple, kwargs: dict, sink: Collector = sink) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            sink.add_batch(x.detach())

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def forward_all(block: nn.Module, inputs: BlockInputs, batch_size: int, out: torch.Tensor | None = None,
                reference: torch.Tensor | None = None, indices: list[int] | None = None) -> float | None:
    """Run ``block`` over (the ``indices`` of) the inputs in micro-batches.

    Args:
        out: where outputs go (``out[i]`` for sample i); may be ``inputs.hidden`` itself, since a micro-batch's
            inputs are no longer needed once its outputs exist.
        reference: outputs to compare with; then the relative squared error
            sum ||Y - reference||^2 / sum ||reference||^2 over the samples is returned.
    """
    idx = list(range(len(inputs))) if indices is None else list(indices)
    err = ref = 0.0
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        y = run_block(block, inputs, inputs.hidden[sel])
        if reference is not None:
            r = reference[sel].float()
            err += float((y.float() - r).pow(2).sum())
            ref += float(r.pow(2).sum())
        if out is not None:
            out[sel] = y.to(out.dtype)
    return err / max(ref, 1e-30) if reference is not None else None


@dataclass
class BlockResult:
    """What the loop records for one block."""

    index: int
    name: str  # qualified name of the block, e.g. model.layers.3
    seconds: float  # wall time of the method on this block plus the propagation pass
    rel_error: float  # ||Y_pruned - Y_dense||^2 / ||Y_dense||^2 on the block's (pruned-upstream) inputs
    info: Any  # what the method returned (per-layer details)


def block_device(block: nn.Module, name: str = "block") -> torch.device:
    """Where ``block`` runs (its weights' device, or its accelerate execution device); pruning edits weights
    in place, so a block whose weights are offloaded (meta tensors) is refused with a one-line error."""
    if any(p.device.type == "meta" for p in block.parameters()):
        raise ZolmError(f"{name} is offloaded (its weights are not in memory): pruning edits weights in place; "
                        "load the model without CPU/disk offload (a device_map over GPUs only, or --device)")
    return module_device(block)


ProcessBlock = Callable[[int, str, nn.Module, BlockInputs, torch.Tensor], Any]


def blockwise(model: nn.Module, input_ids: torch.Tensor, process: ProcessBlock, batch_size: int = 8,
              desc: str = "prune") -> list[BlockResult]:
    """Prune ``model`` block by block (see the module docstring).

    Args:
        input_ids: calibration token ids [N, L].
        process: ``process(index, name, block, inputs, dense)`` prunes ``block`` in place. Before pruning it must
            write the dense block's outputs on ``inputs`` into ``dense`` ([N, L, H]; ``forward_all`` with
            ``out=dense`` does it while statistics are recorded). Its return value is kept as ``info``.
        batch_size: sequences per block forward.
    """
    prefix, blocks = find_block_list(model)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, input_ids)
        dense = torch.empty_like(inputs.hidden)
        results: list[BlockResult] = []
        bar = progress(total=len(blocks), desc=desc)
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            device = block_device(block, f"{prefix}.{i}")
            inputs, dense = inputs.to(device), dense.to(device)  # a sharded model: everything where block i is
            info = process(i, f"{prefix}.{i}", block, inputs, dense)
            rel = forward_all(block, inputs, batch_size, out=inputs.hidden, reference=dense)
            results.append(BlockResult(i, f"{prefix}.{i}", time.perf_counter() - t0, float(rel), info))
            bar.set_postfix(rel_err=f"{rel:.3g}")
            bar.update(1)
        bar.close()
        return results
    finally:
        model.train(was_training)
