"""Save and load quantized models: low-bit codes and scales as safetensors, the QuantConfig in config.json.

The directory is laid out like a ``save_pretrained`` one (config.json, tokenizer files) but only zolm reads it:
config.json carries ``zolm_quantization`` and a ``model_type`` other tools refuse with a message naming zolm
(zolm.artefacts), and ``zolm-quantized.safetensors`` (a name transformers does not look for) holds the int8 /
packed-uint8 / float8 codes and float32 scales instead of float weights, so plain transformers raises instead of
loading random weights. ``zolm.models.load`` recognises it and calls :func:`load_quantized`, which rebuilds the
architecture without allocating float weights and assigns the stored tensors (folders of older zolm versions,
with model.safetensors and the real model_type, load too). ``zolm export --format hf`` writes a float folder and
``--format compressed-tensors`` a pack-quantized one that transformers and vLLM load (zolm.quant.ct).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zolm.artefacts import load_config, mark_config
from zolm.quant.formats import QuantConfig
from zolm.quant.linear import quantize_

WEIGHTS = "zolm-quantized.safetensors"


def is_quantized_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    d = json.loads(cfg.read_text())
    return "zolm_quantization" in d and "quantization_config" not in d  # not a compressed-tensors folder


def save_quantized_files(model, directory: Path) -> None:
    """Write config.json and model.safetensors of a quantized model into ``directory``."""
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    head = state.get("lm_head.weight")
    if head is not None and getattr(model.config, "tie_word_embeddings", False) and any(
            v is not head and v.data_ptr() == head.data_ptr() for v in state.values()):
        del state["lm_head.weight"]  # a float head tied to a float embedding: stored once, re-tied on load
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt", "zolm": "quantized"})
    mark_config(directory, _kind(model.config.zolm_quantization))


def _kind(settings: dict) -> str:
    """The folder kind named in its model_type, e.g. ``int4-g32``."""
    d = {k: v for k, v in settings.items() if k != "tied_head"}
    return QuantConfig.from_dict(d).weight.name


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
    from transformers import AutoModelForCausalLM

    from zolm.quant.placement import cast_float_parts_, place_quantized_

    path = Path(path)
    config = load_config(path)
    settings = dict(config.zolm_quantization)
    del config.zolm_quantization
    tied = settings.pop("tied_head", False)
    with init_empty_weights(include_buffers=False):  # no float weights are allocated
        model = AutoModelForCausalLM.from_config(config)
    # a skeleton: the saved scales replace its own (no scale search: clip act would need calibration data)
    quantize_(model, QuantConfig.from_dict(settings), tied=tied, search=False)
    # own memory, not views of the file's mapping: one view left alive (a norm weight) would keep the whole file
    # resident for the model's life, e.g. beside the float masters of a float-master run (+90 MiB on SmolLM2)
    weights = path / WEIGHTS if (path / WEIGHTS).is_file() else path / "model.safetensors"
    state = {k: v.clone() for k, v in load_file(str(weights)).items()}
    for key, value in state.items():  # optional buffers (pruning masks) exist only where they were saved
        if key.endswith(".sparsity_mask"):
            model.get_submodule(key.rsplit(".", 1)[0]).sparsity_mask = value
    if "lm_head.weight" in model.state_dict() and "lm_head.weight" not in state and config.tie_word_embeddings:
        state["lm_head.weight"] = state[next(n for n, m in model.named_modules()
                                             if m is model.get_input_embeddings()) + ".weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        cast_float_parts_(model, dtype)
    return place_quantized_(model, device, device_map).eval()
