"""Where models and tensors live: ``--device`` values checked, torchrun ranks mapped to GPUs, modules placed.

* :func:`resolve_device` turns ``--device`` into a ``torch.device`` with one-line errors (an unknown name, CUDA
  asked for but absent, a GPU index past the last one). Under ``torchrun`` a bare ``cuda`` means
  ``cuda:LOCAL_RANK``, so that every worker gets its own GPU instead of all of them landing on ``cuda:0``.
* :func:`use_device` makes a CUDA device the current one (``torch.cuda.set_device``).
* :func:`module_device` is where a module computes: its accelerate hook's execution device when it has one
  (a model dispatched with a ``device_map``), else the device of its first parameter or buffer.
* :func:`place_` puts a model on one device or dispatches it over several with a ``device_map`` (accelerate),
  for models that ``from_pretrained`` does not build (zolm's low-bit and compressed folders).
"""

from __future__ import annotations

import itertools
import os

import torch
from torch import nn

from zolm.errors import ZolmError

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def local_rank() -> int:
    """This worker's index on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(device: str | torch.device | None, distributed: bool | None = None) -> torch.device:
    """The checked ``torch.device`` for a ``--device`` value (None: the CPU).

    Args:
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
        distributed: running under torchrun (default: WORLD_SIZE > 1); then ``cuda`` is ``cuda:LOCAL_RANK``.

    Raises:
        ZolmError: a malformed name, a device type this torch build or machine lacks, an index past the last GPU.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ZolmError(f"unknown device {device!r}; e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ZolmError(f"device {device!r}: CUDA is not available (torch {torch.__version__}, "
                            f"{'no GPU visible' if torch.version.cuda else 'built without CUDA'}); use --device cpu")
        if dev.index is None and (_distributed() if distributed is None else distributed):
            dev = torch.device("cuda", local_rank())
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            where = f"LOCAL_RANK {local_rank()} -> " if str(device) == "cuda" else ""
            raise ZolmError(f"device {where}{dev}: only {count} CUDA device(s) visible")
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ZolmError(f"device {device!r} is not available on this machine; use --device cpu or cuda")
    return dev


def use_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device (bare ``cuda`` tensors and NCCL then use it); no-op otherwise."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else its first tensor's device."""
    hook = getattr(module, "_hf_hook", None)
    exec_device = getattr(hook, "execution_device", None)
    if exec_device is not None:
        return torch.device(f"cuda:{exec_device}" if isinstance(exec_device, int) else exec_device)
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor in it (nested tuples, lists, dicts); other values as they are."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj, device: torch.device):
    """``obj`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``."""
    return map_tensors(obj, lambda t: t if t.device == device else t.to(device))


def map_device(device_map: dict, name: str):
    """The device ``device_map`` gives module ``name`` (its longest matching prefix), or None."""
    best = None
    for key, dev in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best[0]):
                best = (key, dev)
    return None if best is None else best[1]


def infer_device_map(model: nn.Module, device_map: str | dict) -> dict:
    """An explicit ``{module name: device}`` for ``device_map``: a dict as given, ``"auto"`` & co. computed by
    accelerate from free memory (decoder blocks are never split), a single device name as ``{"": name}``."""
    if isinstance(device_map, dict):
        return dict(device_map)
    if device_map not in AUTO_MAPS:
        return {"": str(resolve_device(device_map))}
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = None
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)


def place_(model: nn.Module, device: str | torch.device | None = None, device_map: str | dict | None = None,
           force_hooks: bool = False) -> nn.Module:
    """Move ``model`` to ``device``, or dispatch it with ``device_map`` (accelerate; takes precedence).

    ``force_hooks`` adds accelerate's device hooks even when the map names one device (tests use it to run the
    sharded code path on the CPU). Disk offload is refused: ZO updates every trainable weight in place.
    """
    if device_map is None:
        return model.to(resolve_device(device)) if device is not None else model
    from accelerate import dispatch_model

    explicit = infer_device_map(model, device_map)
    if any(str(d) == "disk" for d in explicit.values()):
        raise ZolmError("the device_map offloads part of the model to disk; zolm needs every weight in memory "
                        "(give a map over GPUs and the CPU)")
    return dispatch_model(model, explicit, force_hooks=force_hooks)
