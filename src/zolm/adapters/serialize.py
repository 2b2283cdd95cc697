"""TT adapters on disk, PEFT style: ``adapter_config.json`` + ``adapter_model.safetensors`` in one directory.

The JSON names the adapter type (``zolm-tt``), the base model, rank, bottleneck, activation, scaling, the
placement and, per wrapped module, its side and TT modes; the safetensors file holds only adapter tensors,
keyed by their parameter names in the adapted model. Loading rebuilds exactly the saved wrappers on a base
model and copies the tensors in (shapes and names must match). peft, which reads the same file names, refuses the
folder with a message naming zolm: ``peft_type`` is ``ZOLM_TT (...)``, a type peft does not know (KeyError).

What needs zolm: a TT adapter is a bottleneck adapter x -> x + s * U(act(D x)) with tensor-train factored D and U,
a type peft does not have. With the identity activation it is an affine map and folds into the wrapped layer's
weight and bias (:func:`zolm.adapters.merge_adapters`; ``zolm export --model DIR --format hf`` writes the merged
plain transformers model); with ReLU (AdaZeta's default) it cannot be folded, so only zolm
(``load_model_with_adapters``, ``zolm eval --model DIR``) runs it.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zolm.adapters.inject import (
    TTAdapterConfig,
    TTAdapterLinear,
    _set,
    adapter_layers,
    adapter_parameters,
    features,
    layer_device,
)
from zolm.adapters.lora import CONFIG_FILE, adapter_meta
from zolm.adapters.tt import TTAdapter
from zolm.blocks import is_linear
from zolm.errors import ZolmError
from zolm.quant.linear import QuantLinear
from zolm.utils.io import atomic_dir, atomic_write_json

ADAPTER_TYPE = "zolm-tt"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
PEFT_TYPE = ("ZOLM_TT (a zolm TT adapter, not a peft one: load it with zolm.adapters.load_model_with_adapters "
             "or zolm eval --model; identity adapters merge into a plain model with zolm export --format hf)")


def _zolm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zolm")
    except PackageNotFoundError:
        return "unknown"


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory written by :func:`save_adapters`."""
    return adapter_meta(path).get("adapter_type") == ADAPTER_TYPE


def read_adapter_config(path: str | Path) -> dict:
    """The JSON config of an adapter directory; ZolmError when ``path`` is not one."""
    meta = adapter_meta(path)
    if meta.get("adapter_type") != ADAPTER_TYPE:
        raise ZolmError(f"{path} is not a zolm TT adapter directory (no {CONFIG_FILE} with "
                        f"adapter_type={ADAPTER_TYPE!r})")
    return meta


def save_adapters(model: nn.Module, path: str | Path, base_model: str | None = None, tokenizer=None) -> Path:
    """Write the model's TT adapters to the directory ``path`` (replaced atomically).

    Args:
        model: a model with adapters added by :func:`zolm.adapters.add_tt_adapters`.
        path: the adapter directory.
        base_model: what to load the base from (default: ``model.config.name_or_path``).
        tokenizer: saved alongside when given (so the directory is self-describing).
    """
    layers = adapter_layers(model)
    config = getattr(model, "zolm_adapter_config", None)
    if not layers or config is None:
        raise ZolmError("the model has no TT adapters to save")
    base = base_model or getattr(getattr(model, "config", None), "name_or_path", None) or ""
    meta = {
        "adapter_type": ADAPTER_TYPE, "peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION,
        "zolm_version": _zolm_version(),
        "base_model": str(base), "base_model_name_or_path": str(base), **asdict(config),
        "targets": {name: {"side": w.side, "hidden_modes": w.tt_adapter.down.in_modes,
                           "bottleneck_modes": w.tt_adapter.down.out_modes} for name, w in layers.items()},
    }
    tensors = {n: p.detach().contiguous().cpu() for n, p in adapter_parameters(model).items()}
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "adapter_type": ADAPTER_TYPE})
        atomic_write_json(tmp / CONFIG_FILE, meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapters saved in ``path`` to a base ``model`` (in place) and load their weights.

    The base model is frozen and the adapters are trainable, as after ``add_tt_adapters``. Raises ZolmError
    when a saved target is missing from the model or its size differs.
    """
    meta = read_adapter_config(path)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ZolmError(f"{path} was written by a newer zolm (adapter format {meta['format_version']})")
    known = {f.name for f in fields(TTAdapterConfig)}
    config = TTAdapterConfig(**{k: v for k, v in meta.items() if k in known})
    modules = dict(model.named_modules())
    for name, t in meta["targets"].items():
        base = modules.get(name)
        if base is None or not (is_linear(base) or isinstance(base, QuantLinear)):
            raise ZolmError(f"{path} adapts {name}, which the model lacks (or is not a linear layer): wrong base "
                            f"model? (saved for {meta.get('base_model')!r})")
        size = features(base)[1 if t["side"] == "input" else 0]
        if torch.Size(t["hidden_modes"]).numel() != size:
            raise ZolmError(f"{path} adapts {name} with {torch.Size(t['hidden_modes']).numel()} features, the "
                            f"model's layer has {size}: wrong base model?")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, t in meta["targets"].items():
        base = model.get_submodule(name)
        adapter = TTAdapter(t["hidden_modes"], t["bottleneck_modes"], config.rank, config.activation,
                            config.scaling, config.bias)
        device = layer_device(base)
        _set(model, name, TTAdapterLinear(base, t["side"], adapter.to(device=device)))
    model.zolm_adapter_config = config
    saved = load_file(str(Path(path) / WEIGHTS_FILE))
    params = adapter_parameters(model)
    if set(saved) != set(params):
        extra = sorted(set(saved) ^ set(params))
        raise ZolmError(f"{path}: adapter tensors do not match the model's adapters (e.g. {extra[0]})")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise ZolmError(f"{path}: {n} has shape {tuple(saved[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(saved[n])
    return model


def load_model_with_adapters(path: str | Path, dtype: str | torch.dtype = "float32",
                             device: str | torch.device | None = None, base_model: str | None = None):
    """``(model, tokenizer)``: the base model named in the adapter directory, with the adapters loaded.

    Args:
        path: an adapter directory (see :func:`is_adapter_dir`).
        dtype, device: passed to :func:`zolm.models.load` for the base model (adapters stay float32).
        base_model: load the base from here instead of the saved ``base_model``.
    """
    from zolm import models

    meta = read_adapter_config(path)
    base = base_model or meta.get("base_model")
    if not base:
        raise ZolmError(f"{path} does not name its base model; pass base_model")
    model, tok = models.load(base, dtype, device=device)
    return load_adapters(model, path), tok


def load_model_or_adapters(name_or_path: str, dtype: str | torch.dtype = "float32", merge: bool = False):
    """``(model, tokenizer)`` for anything ``zolm.models.load`` takes, a TT adapter directory (the base it names
    with the adapters) and a peft LoRA directory (zolm.adapters.lora: its ``base/`` low-bit model, or the base it
    names, with the adapter). ``merge``: folded into a plain float transformers model; ZolmError for ReLU TT
    adapters, which do not fold."""
    from zolm import models
    from zolm.adapters.inject import merge_adapters
    from zolm.adapters.lora import is_lora_dir, load_lora_model, merged_lora_model

    if is_lora_dir(name_or_path):
        model, tok = load_lora_model(name_or_path, dtype)
        return (merged_lora_model(model) if merge else model), tok
    if not is_adapter_dir(name_or_path):
        return models.load(name_or_path, dtype)
    model, tok = load_model_with_adapters(name_or_path, dtype)
    if merge:
        activation = model.zolm_adapter_config.activation
        if activation != "identity":
            raise ZolmError(f"{name_or_path} holds {activation} TT adapters, which do not fold into the weights: "
                            "no plain transformers / peft / GGUF form exists; run it with zolm "
                            "(zolm eval --model, zolm.adapters.load_model_with_adapters)")
        model = merge_adapters(model)
    return model, tok
