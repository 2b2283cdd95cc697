"""Keep a pruned model's zeros at zero while fine-tuning it.

A tensor counts as pruned when at least ``threshold`` (default 10%) of its entries are exactly zero; dense
trained weights essentially never are, while pruned ones are 50% zero (unstructured or N:M). Its mask is
``W != 0``, taken when training starts:
* ZO methods perturb and update only the mask's coordinates (bit-packed masks in the ParamSet): fewer
  perturbed coordinates also means a lower-variance estimate (the same lever as MaZO's masks);
* first-order methods zero the gradient outside the mask, so SGD and AdamW (whose moments stay zero there,
  decoupled weight decay included) never move a pruned weight;
* LoRA: the adapter's delta B A is multiplied by the mask of the layer it adapts, in training and when it is
  merged back, so the merged model has exactly the base model's zeros (zolm.adapters.lora.mask_lora_).
"""

from __future__ import annotations

import torch

from zolm.utils.sparse import PRUNED_THRESHOLD, pruned_mask


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
