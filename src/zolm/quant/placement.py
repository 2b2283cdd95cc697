"""dtype and device of a quantized model: float parts in the requested dtype, codes and scales as stored.

A zolm low-bit model holds three kinds of tensors:

* the codes (``qweight``: int8, packed uint8 or float8) -- never cast, they *are* the weights;
* the scales (``scale``, float32) -- kept float32: they define the grid QuZO's updates step on, and a bf16 scale
  would move every weight of its group by up to 0.4% (bf16 keeps 8 significant bits);
* everything else (norms, biases, layers left in float such as an untied LM head, float embeddings) -- cast to
  the requested dtype, as ``from_pretrained(dtype=...)`` does for a float model (modules in the class's
  ``_keep_in_fp32_modules`` stay float32).

The dequantized weights are cast to the dtype of the layer input; a quantized token embedding dequantizes to
float32, so :func:`cast_float_parts_` also makes it return the model's dtype (a forward hook, on the module:
without it a bf16 model would silently compute in float32 from the first layer on).
"""

from __future__ import annotations

import torch
from torch import nn

from zolm.quant.linear import QuantEmbedding, QuantLinear, QuantTiedHead
from zolm.utils.devices import infer_device_map, map_device, place_

KEEP = ("qweight", "scale")  # buffers of the quantized modules that keep their dtype


def _cast_output(dtype: torch.dtype):
    def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.to(dtype) if out.is_floating_point() and out.dtype != dtype else out
    return hook


@torch.no_grad()
def cast_float_parts_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast, in place, every float parameter and persistent buffer but the codes and scales to ``dtype``;
    a quantized embedding's output follows (see the module docstring). Returns ``model``."""
    keep32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if any(k in name for k in keep32):
            continue
        quant = isinstance(module, (QuantLinear, QuantEmbedding))
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        for bname in persistent:
            b = module._buffers[bname]
            if b is None or not b.is_floating_point() or (quant and bname in KEEP) or b.dtype == dtype:
                continue
            module._buffers[bname] = b.to(dtype)
        if isinstance(module, QuantEmbedding):
            old = getattr(module, "_zolm_dtype_hook", None)
            if old is not None:
                old.remove()
            module._zolm_dtype_hook = module.register_forward_hook(_cast_output(dtype))
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype
    return model


def _tied_head_follows_embedding(model: nn.Module, device_map: dict) -> dict:
    """A QuantTiedHead reads the embedding's codes: give it the embedding's device in the map."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, QuantTiedHead):
        return device_map
    names = {id(m): n for n, m in model.named_modules()}
    emb_name, head_name = names.get(id(model.get_input_embeddings())), names.get(id(head))
    if emb_name is None or head_name is None:
        return device_map
    emb_dev = map_device(device_map, emb_name)
    if emb_dev is not None and map_device(device_map, head_name) != emb_dev:
        device_map = {**device_map, head_name: emb_dev}
    return device_map


def place_quantized_(model: nn.Module, device: str | torch.device | None = None,
                     device_map: str | dict | None = None, force_hooks: bool = False) -> nn.Module:
    """Move a quantized model to ``device`` or dispatch it with ``device_map`` (see ``zolm.utils.devices``)."""
    if device_map is None:
        return place_(model, device)
    explicit = _tied_head_follows_embedding(model, infer_device_map(model, device_map))
    return place_(model, device_map=explicit, force_hooks=force_hooks)
