"""The ``base`` part at run time: float weights as loaded, zolm low-bit codes, or fake-quantized float masters.

* ``low-bit``: the model is quantized in place (INT8 / INT4 / FP8 codes, zolm.quant), or checked against the
  run's format when it already is; training then moves its codes (QuZO) or adapters over them.
* ``fake-quant``: every linear weight becomes a float master (the run's dtype) behind a parametrization; the
  forward sees its quantized value ``W + (Q(W) - W).detach()`` (round to nearest on the format's scales, clipped
  for INT4), so backprop passes straight through (STE, ``fo-ste``) and ZO perturbs the master (QuZO's
  float-master regime). The result is saved quantized, as trained.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from zolm import models
from zolm.errors import ZolmError
from zolm.quant.linear import quantize_
from zolm.quant.placement import cast_float_parts_
from zolm.quant.primitives import compute_scales, dequantize, quantize
from zolm.train.config import FinetuneConfig


def ensure_quantized(model, config: FinetuneConfig) -> None:
    """Quantize ``model`` in place as the config says, or check that an already-quantized one matches."""
    qc = config.base.quant_config()
    have = getattr(model.config, "zolm_quantization", None)
    if have is None:
        quantize_(model, qc)  # the new layers' float parts (biases, embedding output) follow the run's dtype
        cast_float_parts_(model, models.resolve_dtype(config.dtype))
    elif _layout(have) != _layout(qc.to_dict()):
        raise ZolmError(f"the model is already quantized as {have['weight']}, not as the run asks "
                        f"({qc.weight.name}); pass matching --bits/--format/--group-size")


def _layout(d: dict) -> dict:
    """A quantization record without what only mattered when the codes were made (tied head, scale search)."""
    out = {k: v for k, v in d.items() if k != "tied_head"}
    out["weight"] = {k: v for k, v in out["weight"].items() if k != "clip"}
    return out


class STEQuant(nn.Module):
    """W -> W + (Q(W) - W).detach(): the forward sees the quantized weight, gradients pass straight through."""

    def __init__(self, fmt):
        super().__init__()
        self.fmt = fmt

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = compute_scales(w, self.fmt)
            wq = dequantize(quantize(w, scale, self.fmt), scale, self.fmt).to(w.dtype)
        return w + (wq - w).detach()


def fake_quantize_(model, config: FinetuneConfig) -> None:
    """Put every nn.Linear (but the format's skipped names) behind an STEQuant parametrization."""
    if getattr(model.config, "zolm_quantization", None):
        raise ZolmError("a fake-quant base needs float weights; this model is already low-bit (use base low-bit)")
    qc = config.base.quant_config()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not any(s in name for s in qc.skip):
            parametrize.register_parametrization(mod, "weight", STEQuant(qc.weight), unsafe=True)


def bake_fake_quant_(model, config: FinetuneConfig):
    """Drop the parametrizations (keeping the float masters) and quantize the model as trained (RTN)."""
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
    return quantize_(model, config.base.quant_config())


def prepare_base_(model, config: FinetuneConfig) -> None:
    """Turn the loaded model into the run's base weights, in place."""
    if config.base.kind == "low-bit":
        ensure_quantized(model, config)
    elif config.base.kind == "fake-quant":
        fake_quantize_(model, config)
    elif getattr(model.config, "zolm_quantization", None):
        raise ZolmError("the model is low-bit (a zolm quantized folder): use a method with a low-bit base "
                        "(e.g. --base low-bit, quzo, quzo-lora) or export it to float first (zolm export --format hf)")
