"""peft LoRA over zolm models: low-bit (QuantLinear) bases, pruned bases, and LoRA directories that keep the base.

* :func:`quant_lora_class`: peft's LoRA ``Linear`` around a frozen zolm ``QuantLinear`` (registered through
  peft's custom-module hook), y = Q(x) + B A x * scaling with the codes untouched and the adapter float32.
* :func:`mask_lora_`: where the base layer is pruned, the delta becomes (B A * scaling) * mask (``W != 0``), in
  the forward and when merged (:func:`merge_masked_lora`), so the pruned zeros stay zero.
* A LoRA directory (:func:`save_lora_over_base`): peft's ``adapter_config.json`` + ``adapter_model.safetensors``
  with the low-bit base it was trained over in ``base/`` -- QLoRA's deployable form, which keeps the base's
  integer grid (merging the delta into INT4 weights and re-rounding loses it: the delta is below half a grid
  step). :func:`load_lora_model` runs it; :func:`merged_lora_model` folds it into a plain float model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zolm.errors import ZolmError
from zolm.quant.linear import QuantLinear
from zolm.utils.io import atomic_dir
from zolm.utils.sparse import PRUNED_THRESHOLD, pruned_mask, unpack_mask

BASE_DIR = "base"  # where a LoRA directory keeps its (low-bit) base model
CONFIG_FILE = "adapter_config.json"  # the folder config of peft LoRA and zolm TT adapters alike


def quant_lora_class():
    """peft's LoRA Linear for a zolm QuantLinear base (defined lazily: peft is imported only when used)."""
    from peft.tuners.lora import Linear

    class QuantLoraLinear(Linear):
        """y = QuantLinear(x) + B A x * scaling: peft's LoRA layer around frozen low-bit codes."""

        def _get_in_out_features(self, module: nn.Module):
            return module.in_features, module.out_features

    return QuantLoraLinear


def register_quant_lora(lora_config, model: nn.Module) -> None:
    """Let peft wrap the model's zolm QuantLinear layers (a no-op on a float model)."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        lora_config._register_custom_module({QuantLinear: quant_lora_class()})


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
            mask = pruned_mask(base.weight, threshold)
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


@torch.no_grad()
def merged_lora_model(model):
    """A plain float transformers model with the (masked) LoRA delta merged, from a copy of ``model``."""
    from zolm.export import to_dense

    model = copy.deepcopy(model)
    for module in model.modules():  # a low-bit base: dequantize each adapted layer, then merge as usual
        base = getattr(module, "base_layer", None)
        if isinstance(base, QuantLinear) and hasattr(module, "lora_A"):
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            dense.weight.data = base.dequantize()
            if base.bias is not None:
                dense.bias.data = base.bias.data.float()
            module.base_layer = dense
    merged = merge_masked_lora(model)
    if getattr(merged.config, "zolm_quantization", None):
        to_dense(merged)  # the rest of the low-bit model (other layers, embedding) as float
    return merged


def adapter_meta(path: str | Path) -> dict:
    """The ``adapter_config.json`` of a folder (TT or peft), or {} when it has none or it is not a JSON object."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return {}
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def is_lora_dir(path: str | Path) -> bool:
    """True when ``path`` is a peft LoRA adapter directory (``adapter_config.json`` with ``peft_type`` LORA)."""
    return adapter_meta(path).get("peft_type") == "LORA"


def save_lora_over_base(peft_model, path: str | Path, tokenizer=None) -> Path:
    """Write the adapter (peft's files) and, in ``path/base``, the frozen base it was trained over (atomically).

    The base is saved as it is (zolm low-bit codes, pruning masks), so loading gives back exactly the trained
    forward; ``base_model_name_or_path`` names that folder.
    """
    from zolm import models

    path = Path(path)
    base = copy.deepcopy(peft_model).unload()  # the base layers, LoRA removed (not merged)
    named = {k: cfg.base_model_name_or_path for k, cfg in peft_model.peft_config.items()}
    try:
        with atomic_dir(path) as tmp:
            for cfg in peft_model.peft_config.values():
                cfg.base_model_name_or_path = str((path / BASE_DIR).resolve())
            peft_model.save_pretrained(tmp, save_embedding_layers=False)  # LoRA A/B only
            models.save(base, tokenizer, tmp / BASE_DIR)
    finally:  # the live model keeps the base it names
        for k, cfg in peft_model.peft_config.items():
            cfg.base_model_name_or_path = named[k]
    return path


def safe_open_keys(file: Path) -> list[str]:
    """The tensor names of a safetensors file (without reading the tensors)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def load_lora_model(path: str | Path, dtype: str | torch.dtype = "float32", base_model: str | None = None):
    """``(peft model, tokenizer)``: a LoRA directory's base (its ``base/`` folder when it has one, else
    ``base_model``, else the base the adapter names) with the adapter loaded, masked where the base is pruned."""
    from peft import LoraConfig, PeftModel
    from peft.utils import get_peft_model_state_dict

    from zolm import models

    path = Path(path)
    if not is_lora_dir(path):
        raise ZolmError(f"{path} is not a peft LoRA directory (no {CONFIG_FILE} with peft_type LORA)")
    config = LoraConfig.from_pretrained(str(path))
    base = base_model or (str(path / BASE_DIR) if (path / BASE_DIR / "config.json").is_file()
                          else config.base_model_name_or_path)
    if not base:
        raise ZolmError(f"{path} does not name its base model; pass base_model")
    model, tok = models.load(base, dtype)
    register_quant_lora(config, model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), config=config)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ZolmError(f"{path}: the adapter does not fit its base {base} ({str(e).splitlines()[0]})") from None
    saved = set(safe_open_keys(path / "adapter_model.safetensors"))
    loaded = set(get_peft_model_state_dict(peft_model))
    if saved != loaded:  # peft only warns: a partly applied adapter would be a silently wrong model
        odd = sorted(saved ^ loaded)[0]
        raise ZolmError(f"{path}: the adapter does not fit its base {base} (e.g. {odd} is "
                        f"{'not in the model' if odd in saved else 'not in the adapter'})")
    mask_lora_(peft_model)
    return peft_model.eval(), tok
