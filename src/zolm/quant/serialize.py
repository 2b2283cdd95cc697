"""Save and load quantized models: low-bit codes and scales as safetensors, the QuantConfig in config.json.

The directory looks like a ``save_pretrained`` one (config.json, model.safetensors, tokenizer files); config.json
carries ``zolm_quantization``, and model.safetensors holds the int8 / packed-uint8 / float8 codes and float32
scales instead of float weights. ``zolm.models.load`` recognises it and calls :func:`load_quantized`, which
rebuilds the architecture without allocating float weights and assigns the stored tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zolm.quant.formats import QuantConfig
from zolm.quant.linear import quantize_


def is_quantized_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "zolm_quantization" in json.loads(cfg.read_text())


def save_quantized_files(model, directory: Path) -> None:
    """Write config.json and model.safetensors of a quantized model into ``directory``."""
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "zolm": "quantized"})


def load_quantized(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   device_map: str | dict | None = None):
    """The quantized model saved in ``path`` (its tokenizer is loaded by the caller).

    Args:
        device: where the model goes (ignored when ``device_map`` is given).
        dtype: dtype of the float parts (norms, biases, float layers; codes and scales keep theirs, see
            ``zolm.quant.placement``); None keeps the stored dtypes.
        device_map: ``"auto"``, a device name or ``{module: device}``: dispatched with accelerate.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from zolm.quant.placement import cast_float_parts_, place_quantized_

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    settings = dict(config.zolm_quantization)
    del config.zolm_quantization
    tied = settings.pop("tied_head", False)
    with init_empty_weights(include_buffers=False):  # no float weights are allocated
        model = AutoModelForCausalLM.from_config(config)
    quantize_(model, QuantConfig.from_dict(settings), tied=tied)
    state = load_file(str(path / "model.safetensors"))
    for key, value in state.items():  # optional buffers (pruning masks) exist only where they were saved
        if key.endswith(".sparsity_mask"):
            model.get_submodule(key.rsplit(".", 1)[0]).sparsity_mask = value
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        cast_float_parts_(model, dtype)
    return place_quantized_(model, device, device_map).eval()
