"""Keep a pruned model's zeros at zero while fine-tuning it.

A tensor counts as pruned when at least ``threshold`` (default 10%) of its entries are exactly zero; dense
trained weights essentially never are, while pruned ones are 50% zero (unstructured or N:M). Its mask is
``W != 0``, taken when training starts:
* ZO methods perturb and update only the mask's coordinates (bit-packed masks in the ParamSet): fewer
  perturbed coordinates also means a lower-variance estimate (the same lever as MaZO's masks);
* first-order methods zero the gradient outside the mask, so SGD and AdamW (whose moments stay zero there,
  decoupled weight decay included) never move a pruned weight;
* LoRA: the adapter's delta B A is multiplied by the mask of the layer it adapts, in training and when it is
  merged back, so the merged model has exactly the base model's zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zolm.utils.sparse import PRUNED_THRESHOLD, pruned_mask, unpack_mask


def sparsity_masks(named: dict[str, torch.Tensor], threshold: float = PRUNED_THRESHOLD) -> dict[str, torch.Tensor]:
    """{name: W != 0} for every tensor with at least ``threshold`` exact zeros (2-D weights only)."""
    masks = {name: pruned_mask(p, threshold) for name, p in named.items()}
    return {name: m for name, m in masks.items() if m is not None}


def mask_gradients_(named: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> list:
    """Register hooks that zero gradients outside the masks; returns the hook handles."""
    handles = []
    for name, mask in masks.items():
        m = mask.to(named[name].dtype)
        handles.append(named[name].register_hook(lambda g, m=m: g * m))
    return handles


def mask_lora_(peft_model, threshold: float = PRUNED_THRESHOLD) -> int:
    """Make every LoRA layer of a peft model whose base weight is pruned add (B A * scaling) * mask.

    Returns the number of masked layers. The masked delta is computed explicitly (r is small) and used both
    in the forward pass and by :func:`merge_masked_lora`.
    """
    count = 0
    for module in peft_model.modules():
        base = getattr(module, "base_layer", None)
        if not hasattr(module, "lora_A"):
            continue
        if getattr(base, "sparsity_mask", None) is not None:  # a pruned zolm QuantLinear: its stored W != 0
            mask = unpack_mask(base.sparsity_mask, base.out_features * base.in_features)
            mask = mask.view(base.out_features, base.in_features)
        elif isinstance(base, nn.Linear):
            mask = sparsity_masks({"w": base.weight}, threshold).get("w")
        else:
            mask = None
        if mask is None:
            continue
        module.register_buffer("zolm_mask", mask, persistent=False)
        module.register_forward_hook(_masked_lora_forward)
        count += 1
    return count


def masked_delta(module) -> torch.Tensor:
    """(B A * scaling) * mask of the active adapter of a masked LoRA layer."""
    name = module.active_adapters[0]
    delta = (module.lora_B[name].weight @ module.lora_A[name].weight) * module.scaling[name]
    return delta * module.zolm_mask


def _masked_lora_forward(module, args, output):
    x = args[0]
    dtype = module.base_layer.weight.dtype if isinstance(module.base_layer, nn.Linear) else x.dtype
    return module.base_layer(x) + F.linear(x.to(dtype), masked_delta(module).to(x.dtype))


@torch.no_grad()
def merge_masked_lora(peft_model):
    """Merge LoRA adapters into their base weights (masked where the base is pruned); returns the base model."""
    for module in peft_model.modules():
        if hasattr(module, "zolm_mask"):
            module.base_layer.weight += masked_delta(module).to(module.base_layer.weight.dtype)
            for name in list(module.lora_A.keys()):  # the delta is merged: zero the adapter before unloading
                module.lora_B[name].weight.zero_()
    return peft_model.merge_and_unload()
