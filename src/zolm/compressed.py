"""A compact on-disk form for pruned models: a bitmap plus the non-zero values of each sparse tensor.

Layout of a compressed directory::

    zolm_compressed.json          manifest: format, version, per-tensor encoding, tied-weight aliases
    model.compressed.safetensors  dense tensors under their own names; for each sparse tensor NAME:
                                    NAME::bitmap  uint8, the non-zero pattern in row-major order packed 8 per
                                                  byte (numpy.packbits, little bit order)
                                    NAME::values  the non-zero entries in the same order, original dtype
    config.json, generation_config.json, tokenizer files   as save_pretrained writes them

A tensor is stored this way when that is smaller: ceil(n/8) + nnz * itemsize < n * itemsize, i.e. for float32
when more than 1/32 of it is zero. At 50% sparsity a float32 linear weight takes 53% of its dense size; the
embedding (no zeros) stays dense. Loading rebuilds exactly the saved weights (``torch.equal``; a -0.0 comes
back as +0.0). Plain ``transformers`` refuses this directory with a message naming zolm (its config.json has a
``model_type`` no other tool knows, zolm.artefacts); :func:`load_compressed` (and ``zolm.models.load``) reads it,
and ``zolm export --format hf`` turns it into an ordinary save_pretrained folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zolm.artefacts import load_config, mark_config
from zolm.errors import ZolmError
from zolm.utils.io import atomic_dir

MANIFEST = "zolm_compressed.json"
WEIGHTS = "model.compressed.safetensors"
FORMAT, VERSION = "zolm-bitmap", 1


def is_compressed(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory written by :func:`save_compressed`."""
    return (Path(path).expanduser() / MANIFEST).is_file()


def _worth_it(t: torch.Tensor, nnz: int) -> bool:
    return t.is_floating_point() and t.dim() >= 2 and (t.numel() + 7) // 8 + nnz * t.element_size() < \
        t.numel() * t.element_size()


def encode(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors to write and the manifest's ``tensors``/``aliases`` entries for a state dict."""
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:  # tied weights (embedding / LM head): stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu().contiguous()
        keep = (t != 0).reshape(-1)
        nnz = int(keep.sum())
        if _worth_it(t, nnz):
            out[f"{name}::bitmap"] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
            out[f"{name}::values"] = t.reshape(-1)[keep]
            entries[name] = {"encoding": "bitmap", "shape": list(t.shape), "nnz": nnz}
        else:
            out[name] = t
            entries[name] = {"encoding": "dense"}
    return out, {"tensors": entries, "aliases": aliases}


def decode(tensors: dict[str, torch.Tensor], manifest: dict) -> dict[str, torch.Tensor]:
    """The full state dict back from what :func:`encode` wrote (aliases included)."""
    state: dict[str, torch.Tensor] = {}
    for name, entry in manifest["tensors"].items():
        if entry["encoding"] == "dense":
            state[name] = tensors[name]
            continue
        shape = entry["shape"]
        n = int(np.prod(shape))
        keep = torch.from_numpy(np.unpackbits(tensors[f"{name}::bitmap"].numpy(), count=n, bitorder="little"))
        values = tensors[f"{name}::values"]
        if int(keep.sum()) != values.numel():
            raise ZolmError(f"compressed tensor {name}: bitmap and values disagree ({int(keep.sum())} vs "
                            f"{values.numel()} non-zeros)")
        full = torch.zeros(n, dtype=values.dtype)
        full[keep.bool()] = values
        state[name] = full.view(shape)
    for alias, source in manifest.get("aliases", {}).items():
        state[alias] = state[source]
    return state


def save_compressed(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` (and ``tokenizer`` if given) in the compressed form, atomically; returns the directory."""
    from safetensors.torch import save_file

    tensors, manifest = encode(model.state_dict())
    manifest = {"format": FORMAT, "version": VERSION, "model_class": type(model).__name__, **manifest}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        mark_config(tmp, "compressed")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    if not is_compressed(path):
        raise ZolmError(f"{path} is not a compressed zolm model (no {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > VERSION:
        raise ZolmError(f"{path / MANIFEST}: unsupported format {manifest.get('format')!r} "
                        f"version {manifest.get('version')!r} (this zolm reads {FORMAT} <= {VERSION})")
    return manifest


def load_compressed(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """``(model, tokenizer or None)`` from a directory written by :func:`save_compressed` (model in eval mode).

    Args:
        dtype: cast the model to this dtype (default: the dtype the tensors were saved in).
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    state = decode(load_file(str(path / WEIGHTS)), manifest)
    config = load_config(path)
    saved = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers: initialise, then overwrite
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=saved)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ZolmError(f"{path}: weights do not fit {type(model).__name__} (missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, config=config) if (path / "tokenizer_config.json").is_file() \
        else None
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer
