"""Quantized layers that really store low-bit weights, and ``quantize_`` to swap them into a model.

QuantLinear keeps integer (or FP8) codes plus float32 scales as buffers -- INT4 packed two codes per byte -- so
resident memory drops; the forward pass dequantizes one layer at a time (W = s * q) and calls F.linear.
A ``weight_hook`` lets a zeroth-order method supply the perturbed dequantized W inside the forward pass
without ever writing the perturbation into the codes (QuZO's perturbations are far below one grid step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zolm.blocks import is_linear, out_in
from zolm.errors import ZolmError
from zolm.quant.formats import QuantConfig, QuantFormat
from zolm.quant.primitives import compute_scales, dequantize, group_view, quantize
from zolm.utils.log import get_logger
from zolm.utils.sparse import pack_mask, pruned_mask

log = get_logger(__name__)


def fake_quant_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor symmetric INT fake quantization of activations (dynamic absmax, round to nearest); under autograd
    the gradient passes straight through (the forward value is the same)."""
    qmax = 2 ** (bits - 1) - 1
    s = x.detach().abs().amax().clamp(min=1e-8) / qmax
    xq = (x / s).round().clamp(-qmax - 1, qmax) * s
    if x.requires_grad:  # backprop (LoRA / adapters over a low-bit base): straight through the rounding
        return x + (xq - x).detach()
    return xq


class QuantLinear(nn.Module):
    """y = x W^T + b with W = s * q, q stored in ``fmt``; ``weight_hook(self)``, when set, may return W itself
    (the perturbed weight of a ZO query, computed in one pass from the codes) or None for s * q."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat, bias: bool = False,
                 act_bits: int | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.act_bits = in_features, out_features, fmt, act_bits
        cols = in_features // 2 if fmt.kind == "int" and fmt.bits == 4 else in_features
        groups = in_features // (fmt.group_size or in_features)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=fmt.storage_dtype, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        # bit-packed W != 0 of a pruned layer (zolm.utils.sparse): training never moves its zeros
        self.register_buffer("sparsity_mask", None)
        self.weight_hook: Callable[[QuantLinear], torch.Tensor | None] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: QuantFormat, act_bits: int | None = None,
                    importance: torch.Tensor | None = None, search: bool = True) -> QuantLinear:
        """Quantize an nn.Linear (or GPT-2's Conv1D, whose weight is stored ``[in, out]``): scales from
        :func:`compute_scales` (``importance``: its input's mean squares, for clip act), round-to-nearest codes.
        ``search=False``: absmax scales whatever ``fmt.clip`` says (a skeleton whose scales are loaded or set next)."""
        w = out_in(linear).detach().contiguous()  # [out, in] for both
        group_view(w, fmt.group_size)  # validates the group size against this layer
        q = cls(w.shape[1], w.shape[0], fmt, linear.bias is not None, act_bits, w.device)
        q.scale.copy_(compute_scales(w, fmt if search else dataclasses.replace(fmt, clip="none"), importance))
        q.qweight.copy_(quantize(w, q.scale, fmt))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        mask = pruned_mask(w)
        if mask is not None:
            q.sparsity_mask = pack_mask(mask)
        return q

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight_hook is None else self.weight_hook(self)
        if w is None:
            w = self.dequantize()
        if self.act_bits is not None:
            x = fake_quant_activation(x, self.act_bits)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def extra_repr(self) -> str:
        act = f", act_bits={self.act_bits}" if self.act_bits else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}{act}"


class QuantEmbedding(nn.Module):
    """Token embedding with per-row INT codes; only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, dim: int, bits: int, padding_idx: int | None = None,
                 device: torch.device | str | None = None, fp16_scales: bool = False):
        super().__init__()
        self.fmt = QuantFormat("int", bits, fp16_scales=fp16_scales)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, dim, padding_idx
        cols = dim // 2 if bits == 4 else dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, cols, dtype=self.fmt.storage_dtype, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, 1, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, fp16_scales: bool = False) -> QuantEmbedding:
        w = emb.weight.detach()
        q = cls(emb.num_embeddings, emb.embedding_dim, bits, emb.padding_idx, w.device, fp16_scales)
        q.scale.copy_(compute_scales(w, q.fmt))
        q.qweight.copy_(quantize(w, q.scale, q.fmt))
        return q

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize(self.qweight[flat], self.scale[flat], self.fmt).view(*ids.shape, self.embedding_dim)

    def row_range(self, start: int, end: int) -> torch.Tensor:
        """Rows start .. end-1 dequantized (the same values as ``rows`` of those ids, without gathering codes)."""
        return dequantize(self.qweight[start:end], self.scale[start:end], self.fmt)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (materialises it: for inspection, not for the forward pass)."""
        return dequantize(self.qweight, self.scale, self.fmt)


class QuantTiedHead(nn.Module):
    """LM head tied to a QuantEmbedding: logits = h E^T, dequantizing E in vocabulary chunks."""

    def __init__(self, embedding: QuantEmbedding, chunk: int = 8192):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # a reference, not a submodule: one copy of the codes
        self.chunk = chunk

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        parts = []
        for start in range(0, e.num_embeddings, self.chunk):
            parts.append(F.linear(h, e.row_range(start, min(start + self.chunk, e.num_embeddings)).to(h.dtype)))
        return torch.cat(parts, dim=-1)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """The QuantLinear layers of a model, in module order (the order QuZO keys its perturbations by)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, tied: bool | None = None,
              importance: dict[str, torch.Tensor] | None = None, search: bool = True) -> nn.Module:
    """Replace, in place, every nn.Linear and GPT-2 Conv1D (but ``config.skip`` names) with a QuantLinear, and the
    token embedding (with a tied LM head) with QuantEmbedding when ``config.embed_bits`` is set.

    ``filter_fn(module, name)`` narrows the linear layers further; ``tied`` says whether the LM head shares
    the embedding (default: detected); ``importance`` maps layer names to their inputs' mean squares
    (zolm.quant.calibrate.input_importance), which clip act needs; ``search=False`` builds a skeleton whose
    scales and codes are loaded or set next (absmax, no scale search; the record keeps ``config``'s clip).
    The model keeps its transformers class;
    ``model.config.zolm_quantization`` records the configuration (saved in config.json).
    """
    if getattr(model.config, "zolm_quantization", None):
        raise ZolmError("the model is already quantized")
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if tied is None:
        tied = head is not None and getattr(head, "weight", None) is emb.weight
    skip = config.skip + (("lm_head",) if tied and config.embed_bits is not None else ())
    targets = [(n, m) for n, m in model.named_modules() if is_linear(m)
               and not any(s in n for s in skip) and (filter_fn is None or filter_fn(m, n))]
    if not targets:
        raise ZolmError("no linear layer to quantize")
    act = search and config.weight.clip == "act"
    if act and importance is None:
        raise ZolmError("clip act needs calibration importance (zolm.quant.calibrate.calibrated_importance)")
    unseen = [n for n, _ in targets if act and n not in importance]
    if unseen:  # e.g. experts no calibration token reached: their error has no weights, so the unweighted search
        log.warning("clip act: %d layer(s) saw no calibration input (e.g. %s); they use clip mse", len(unseen),
                    unseen[0])
    for name, lin in targets:
        fmt = dataclasses.replace(config.weight, clip="mse") if name in unseen else config.weight
        imp = None if importance is None else importance.get(name)
        _set_module(model, name, QuantLinear.from_linear(lin, fmt, config.act_bits, imp, search))
    if config.embed_bits is not None:
        qemb = QuantEmbedding.from_embedding(emb, config.embed_bits, bool(config.embed_fp16_scales))
        model.set_input_embeddings(qemb)
        if tied:
            model.set_output_embeddings(QuantTiedHead(qemb))
    model.config.zolm_quantization = {**config.to_dict(), "tied_head": bool(tied and config.embed_bits)}
    return model
