"""Data-parallel helpers on torch.distributed (gloo on CPU, nccl on GPUs), started by ``torchrun``.

zolm's data parallelism for ZO needs one collective: every worker perturbs the same weights with the same
seeds, computes the loss on its shard of the batch, and the workers sum a few scalars (loss sums and counts).
Weights never travel. Outside ``torchrun`` (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for workers on ``device``: gloo on the CPU; on GPUs nccl for CUDA tensors and
    gloo for CPU ones (``cpu:gloo,cuda:nccl``), so that CPU scalars and GPU gradients both reduce."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: torch.device | str = "cpu") -> bool:
    """Join the process group torchrun describes (idempotent); returns True when running distributed.

    On CUDA ``device`` must be this worker's GPU (``zolm.utils.devices.resolve_device`` maps ``cuda`` to
    ``cuda:LOCAL_RANK``); it becomes the current device and the group is bound to it.
    """
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        device = torch.device(device)
        kwargs = {}
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend_for(device), **kwargs)
    return True


def reduce_device() -> torch.device:
    """Where scalar reductions happen: the CPU when the process group reduces CPU tensors (gloo, or a
    ``cpu:gloo,cuda:nccl`` group), else the current GPU (a group that is nccl alone rejects CPU tensors)."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or ("nccl" not in backend and "cuda" not in backend):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class Reducer:
    """Sums float scalars across workers and counts the bytes this worker contributes (the payload)."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls = 0

    def sum(self, values: Sequence[float]) -> list[float]:
        if world_size() <= 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.bytes_sent += t.numel() * t.element_size()
        self.calls += 1
        return t.tolist()


def shard(items: Sequence, r: int | None = None, n: int | None = None) -> list:
    """Worker ``r``'s contiguous share of ``items`` (sizes differ by at most one)."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    q, extra = divmod(len(items), n)
    start = r * q + min(r, extra)
    return list(items[start:start + q + (1 if r < extra else 0)])


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def destroy() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_(tensors: Sequence[torch.Tensor]) -> int:
    """Sum tensors across workers in place (one flat buffer); returns the bytes this worker sent."""
    if world_size() <= 1 or not tensors:
        return 0
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    pos = 0
    for t in tensors:
        t.copy_(flat[pos:pos + t.numel()].view_as(t))
        pos += t.numel()
    return flat.numel() * flat.element_size()
