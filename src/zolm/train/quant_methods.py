"""Quantized training methods: QuZO, the naive quantized MeZO baseline, and first order with STE.

* ``quzo``: the model is quantized (INT8 / INT4 / FP8 codes, zolm.quant) and ZO trains the codes of the linear
  layers with quantized perturbations and stochastically rounded updates (zolm.zo.quzo).
* ``quant-mezo``: the same quantized model, MeZO's full-precision perturbation, updates rounded to nearest:
  the naive way to run ZO on low-bit weights (most updates round to zero).
* ``fo-ste``: backpropagation through fake-quantized linear weights with a straight-through estimator
  (W_q = W + (Q(W) - W).detach()), AdamW on float32 master weights; the result is saved quantized.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from zolm import models
from zolm.errors import ZolmError
from zolm.quant.linear import quantize_, quantized_modules
from zolm.quant.placement import cast_float_parts_
from zolm.quant.primitives import compute_scales, dequantize, quantize
from zolm.train.config import FinetuneConfig
from zolm.train.methods import FOMethod, ZOMethod
from zolm.zo.optimizer import ZOConfig
from zolm.zo.quzo import QuZOOptimizer, QuZOSettings


def ensure_quantized(model, config: FinetuneConfig) -> None:
    """Quantize ``model`` in place as the config says, or check that an already-quantized one matches."""
    qc = config.quant_config()
    have = getattr(model.config, "zolm_quantization", None)
    if have is None:
        quantize_(model, qc)  # the new layers' float parts (biases, embedding output) follow the run's dtype
        cast_float_parts_(model, models.resolve_dtype(config.dtype))
    elif {k: v for k, v in have.items() if k != "tied_head"} != qc.to_dict():
        raise ZolmError(f"the model is already quantized as {have['weight']}, not as the run asks "
                        f"({qc.weight.name}); pass matching --bits/--format/--group-size")


class QuZOMethod(ZOMethod):
    """ZO on low-bit codes: QuZO (``quzo``) or the naive baseline (``quant-mezo``)."""

    def build_optimizer(self, model, config: FinetuneConfig, zo: ZOConfig) -> QuZOOptimizer:
        ensure_quantized(model, config)
        naive = config.method == "quant-mezo"
        settings = QuZOSettings(
            perturb_bits=config.perturb_bits if config.perturb_bits is not None else (0 if naive else 4),
            two_draws=config.two_draws,
            update_rounding=config.update_rounding or ("nearest" if naive else "stochastic"))
        inc = [re.compile(p) for p in config.train_params]
        exc = [re.compile(p) for p in config.freeze_params]
        modules = [(n, m) for n, m in quantized_modules(model)
                   if (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)]
        return QuZOOptimizer(modules, zo, settings)


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


class FOSTEMethod(FOMethod):
    """First-order training of fake-quantized linear layers (straight-through estimator), AdamW."""

    def __init__(self, model, config: FinetuneConfig, run_dir: Path | None = None):
        qc = config.quant_config()
        skip = qc.skip
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and not any(s in name for s in skip):
                parametrize.register_parametrization(mod, "weight", STEQuant(qc.weight), unsafe=True)
        self.quant = qc
        super().__init__(model, config, run_dir)  # trains <layer>.parametrizations.weight.original (fp32 master)

    def save_model(self, path: Path, tokenizer) -> None:
        """Bake the master weights, quantize them as trained (RTN), save the low-bit model."""
        for mod in self.model.modules():
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        quantize_(self.model, self.quant)
        models.save(self.model, tokenizer, path)
