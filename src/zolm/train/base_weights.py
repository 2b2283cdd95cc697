"""The ``base`` part at run time: float weights as loaded, zolm low-bit codes, or fake-quantized float masters.

* ``low-bit``: the model is quantized in place (INT8 / INT4 / FP8 codes, zolm.quant), or checked against the
  run's format when it already is; training then moves its codes (QuZO) or adapters over them.
* ``fake-quant``: every linear weight becomes a float master (the run's dtype) behind a parametrization; the
  forward sees its quantized value Q(W) (round to nearest on the format's scales, clipped
  for INT4) and backprop passes straight through (STE, ``fo-ste``) and ZO perturbs the master (QuZO's
  float-master regime). The result is saved quantized, as trained.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from zolm import models
from zolm.blocks import is_linear, out_in
from zolm.errors import ZolmError
from zolm.quant.formats import QuantFormat
from zolm.quant.linear import QuantEmbedding, QuantLinear, quantize_
from zolm.quant.placement import cast_float_parts_
from zolm.quant.primitives import compute_scales, fake_quantize, quantize
from zolm.train.config import FinetuneConfig


def ensure_quantized(model, config: FinetuneConfig) -> None:
    """Quantize ``model`` in place as the config says, or check that an already-quantized one matches."""
    qc = config.base.quant_config()
    have = getattr(model.config, "zolm_quantization", None)
    if have is None:
        quantize_(model, qc)  # the new layers' float parts (biases, embedding output) follow the run's dtype
        cast_float_parts_(model, models.resolve_dtype(config.dtype))
    else:
        check_layout(have, qc)


def check_layout(have: dict, qc) -> None:
    """Raise ZolmError unless a saved model's quantization record ``have`` is the layout the run asks for."""
    if _layout(have) != _layout(qc.to_dict()):
        raise ZolmError(f"the model is already quantized as {have['weight']}, not as the run asks "
                        f"({qc.weight.name}); pass matching --bits/--format/--group-size/--embed-bits")


def _layout(d: dict) -> dict:
    """A quantization record without what only mattered when the codes were made (tied head, scale search)."""
    out = {k: v for k, v in d.items() if k != "tied_head"}
    out["weight"] = {k: v for k, v in out["weight"].items() if k != "clip"}
    return out


class _StraightThrough(torch.autograd.Function):
    """Forward Q(W), backward the identity: the straight-through estimator without the two full-size
    temporaries of ``W + (Q(W) - W).detach()`` (which gave the same values)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, quantizer: STEQuant) -> torch.Tensor:  # noqa: D102
        return quantizer.quantized(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


class STEQuant(nn.Module):
    """W -> Q(W) in the forward; gradients pass straight through (dQ/dW := I).

    ``scale`` None: the scales follow W (recomputed every forward, as STE training does); a tensor: fixed scales
    (QuZO's float-master runs: the grid is set once, round to nearest onto it). A ZO forward (no autograd) makes
    one temporary the size of the weight, the quantized copy, which is freed after its layer.
    """

    def __init__(self, fmt, scale: torch.Tensor | None = None, transposed: bool = False):
        super().__init__()
        self.fmt, self.transposed = fmt, transposed  # transposed: a GPT-2 Conv1D weight, stored [in, out]
        self.register_buffer("scale", scale, persistent=False)

    @torch.no_grad()
    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        """Q(W) in W's dtype and layout."""
        v = w.t() if self.transposed else w
        scale = self.scale if self.scale is not None else compute_scales(v, self.fmt)
        wq = fake_quantize(v, scale, self.fmt).to(w.dtype)
        return wq.t().contiguous() if self.transposed else wq

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and w.requires_grad:
            return _StraightThrough.apply(w, self)
        return self.quantized(w)


@torch.no_grad()
def float_masters_(model, config: FinetuneConfig) -> dict[str, torch.Tensor]:
    """A zolm low-bit model as float masters on its own grid, in place: every QuantLinear / QuantEmbedding becomes
    the float module holding its dequantized codes (zolm.export.to_dense); returns ``{module name: scale}`` so that
    the fake-quant forward rounds onto exactly the saved grid: the run starts from the low-bit model's forward
    (QuZO's float-master regime after ``zolm quantize``). The format must be the run's."""
    from zolm.export import to_dense

    check_layout(model.config.zolm_quantization, config.base.quant_config())
    scales = {name: mod.scale.detach().clone() for name, mod in model.named_modules()
              if isinstance(mod, QuantLinear | QuantEmbedding)}
    to_dense(model)
    cast_float_parts_(model, models.resolve_dtype(config.dtype))
    return scales


def fake_quantize_(model, config: FinetuneConfig) -> None:
    """Put every nn.Linear (but the format's skipped names) behind an STEQuant parametrization; a zolm low-bit
    model first becomes float masters on its own grid (:func:`float_masters_`, fixed scales only)."""
    fixed = config.base.fake_scales == "fixed"
    given: dict[str, torch.Tensor] = {}
    if getattr(model.config, "zolm_quantization", None):
        if not fixed:
            raise ZolmError("a fake-quant base over a low-bit model needs fixed scales (its own grid): use "
                            "--fake-scales fixed, or load float weights")
        given = float_masters_(model, config)
    qc = config.base.quant_config()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    targets = [(name, mod, qc.weight) for name, mod in model.named_modules() if is_linear(mod)
               and not any(s in name for s in qc.skip) and not (tied and mod is head)]
    if qc.embed_bits is not None:  # the saved model stores the embedding (and a tied head) per row in INT
        efmt = QuantFormat("int", qc.embed_bits, fp16_scales=bool(qc.embed_fp16_scales))
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        targets += [(emb_name, emb, efmt)] + ([("", head, efmt)] if tied else [])
    scales = {}
    for name, mod, fmt in targets:
        transposed = is_linear(mod) and not isinstance(mod, nn.Linear)
        view = out_in(mod) if is_linear(mod) else mod.weight
        if fixed and id(mod.weight) not in scales:
            scales[id(mod.weight)] = given[name] if name in given else compute_scales(view, fmt)
        scale = scales.get(id(mod.weight))
        parametrize.register_parametrization(mod, "weight", STEQuant(fmt, scale, transposed), unsafe=True)


@torch.no_grad()
def bake_fake_quant_(model, config: FinetuneConfig):
    """Drop the parametrizations (keeping the float masters) and quantize the model as trained: round to nearest
    on fixed scales where the run used them (the saved codes are exactly what the forward saw), else on fresh ones."""
    fixed, masters = {}, {}
    emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    for name, mod in list(model.named_modules()):
        if parametrize.is_parametrized(mod, "weight"):
            scale = mod.parametrizations.weight[0].scale
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            if scale is not None:
                view = out_in(mod) if is_linear(mod) else mod.weight
                fixed[name], masters[name] = scale, view.detach().clone()
    quantize_(model, config.base.quant_config(), search=not fixed)  # fixed: every scale is set below
    for name, scale in fixed.items():
        q = model.get_submodule(name)
        if name != emb_name and not isinstance(q, QuantLinear):
            continue  # a tied head: it reads the embedding's codes
        q.scale.copy_(scale)
        q.qweight.copy_(quantize(masters[name], scale, q.fmt))
    return model


def prepare_base_(model, config: FinetuneConfig) -> None:
    """Turn the loaded model into the run's base weights, in place."""
    if config.base.kind != "float" and config.base.clip == "act" and not getattr(model.config, "zolm_quantization",
                                                                                 None):
        raise ZolmError("clip act needs calibration activations, which fine-tuning does not collect: quantize with "
                        "`zolm quantize --clip act` first and fine-tune the saved model")
    if config.base.kind == "low-bit":
        ensure_quantized(model, config)
    elif config.base.kind == "fake-quant":
        fake_quantize_(model, config)
    elif getattr(model.config, "zolm_quantization", None):
        raise ZolmError("the model is low-bit (a zolm quantized folder): use a method with a low-bit base "
                        "(e.g. --base low-bit, quzo, quzo-lora) or export it to float first (zolm export --format hf)")
