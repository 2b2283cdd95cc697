"""Decoder blocks of any decoder-only ``transformers`` model: find them, find their linear layers, run one alone.

Block-wise pruning (Wanda, SparseGPT, Wanda++) needs four things, resolved here once for every model family
instead of once per family (Wanda's repository has ``prune.py`` and a near-copy ``prune_opt.py``):

* :func:`decoder_blocks`: the block list. It is found by structure, not by name: the ``nn.ModuleList`` whose
  children are all of one class and hold linear layers, and which has the most parameters (Llama, Qwen2 and
  Mistral ``model.layers``, OPT ``model.decoder.layers``, GPT-2 ``transformer.h``). A model without such a list
  gets a one-line :class:`~zolm.errors.ZolmError`.
* :func:`linear_layers`: the prunable layers of a block by name: ``nn.Linear`` and GPT-2's ``Conv1D`` (a linear
  layer whose weight is stored transposed, ``[in, out]``); :func:`out_in` gives every weight as ``[out, in]``.
* :func:`capture_block_inputs`: the inputs of block 0 for calibration sequences, plus every other argument the
  model passes to its blocks (attention mask, position ids, rotary ``position_embeddings``, cache flags...).
  A forward pre-hook with ``with_kwargs=True`` records them while the model runs with its block list cut down to
  block 0, so no exception is used as control flow and the remaining blocks and the LM head never run.
* :func:`run_block`: one block on a micro-batch of hidden states with those arguments.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zolm.errors import ZolmError
from zolm.utils.devices import map_tensors, module_device, to_device


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2's ``Conv1D``."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def out_in(layer: nn.Module, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """``layer``'s weight data (or a tensor of the weight's shape) as ``[out_features, in_features]``.

    For ``nn.Linear`` this is the tensor itself; for ``Conv1D`` (weight ``[in, out]``) it is the transpose, a
    view, so in-place writes such as ``out_in(layer).masked_fill_(...)`` reach the stored weight.
    """
    if tensor is None and getattr(layer, "weight", None) is None:
        raise ZolmError(f"{type(layer).__name__} stores low-bit codes, not a float weight: export the model to float "
                        "first (zolm export --format hf)")
    t = layer.weight.data if tensor is None else tensor
    return t if isinstance(layer, nn.Linear) else t.t()


def is_low_bit_linear(module: nn.Module) -> bool:
    """A zolm QuantLinear (codes + scales, no float weight), recognised by its attributes (zolm.quant is above)."""
    return getattr(module, "qweight", None) is not None and hasattr(module, "in_features")


def _structural(module: nn.Module) -> bool:
    return is_linear(module) or is_low_bit_linear(module)


def _holds_linear(module: nn.Module) -> bool:
    return any(_structural(m) for m in module.modules())


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, list)`` of the model's decoder blocks (see the module docstring for the rule)."""
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not _holds_linear(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        key = (size, -name.count("."))  # most parameters; the shallowest list on a tie
        if best is None or key > best[:2]:
            best = (*key, name, module)
    if best is None:
        raise ZolmError(f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
                        "same-class modules holding linear layers")
    return best[2], best[3]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, in execution order."""
    return find_block_list(model)[1]


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of one block by their name inside it (``self_attn.q_proj``, ``mlp.down_proj``...)."""
    layers = {name: m for name, m in block.named_modules() if name and _structural(m)}
    if not layers:
        raise ZolmError(f"block {type(block).__name__} has no linear layers to prune")
    return layers


@dataclass
class BlockInputs:
    """What a decoder block is called with: hidden states of N sequences and the shared other arguments.

    ``args``/``kwargs`` were captured with a batch of one sequence; tensors in them (causal mask ``[1, 1, L, L]``,
    position ids ``[1, L]``, rotary cos/sin ``[1, L, d]``) broadcast over any micro-batch of the same length.
    """

    hidden: torch.Tensor  # [N, L, H]
    args: tuple = ()  # positional arguments after the hidden states (GPT-2 passes the mask positionally)
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_key: str | None = None  # the keyword the hidden states came as, if not positional

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, device: torch.device) -> BlockInputs:
        """These inputs on ``device`` (self when they are there already): a block of a sharded model runs where
        its weights are, so its inputs and the shared arguments (mask, rotary cos/sin) go there first."""
        if all(t.device == device for t in _tensors((self.hidden, self.args, self.kwargs))):
            return self
        return BlockInputs(self.hidden.to(device), to_device(self.args, device), to_device(self.kwargs, device),
                           self.hidden_key)

    def cast(self, dtype: torch.dtype) -> BlockInputs:
        """A copy whose floating-point tensors (hidden states, masks, cos/sin) have ``dtype``."""
        return BlockInputs(self.hidden.to(dtype), _cast(self.args, dtype), _cast(self.kwargs, dtype),
                           self.hidden_key)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor in it cast to ``dtype``."""
    return map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


def run_block(block: nn.Module, inputs: BlockInputs, hidden: torch.Tensor) -> torch.Tensor:
    """Run one block on ``hidden`` ([B, L, H]) with the captured arguments; returns the output hidden states."""
    if inputs.hidden_key is None:
        out = block(hidden, *inputs.args, **inputs.kwargs)
    else:
        out = block(*inputs.args, **{inputs.hidden_key: hidden}, **inputs.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _only_first_block(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace the block list by a list holding only block 0; yields block 0."""
    name, blocks = find_block_list(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList([blocks[0]]))
    try:
        yield blocks[0]
    finally:
        setattr(parent, attr, blocks)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor) -> BlockInputs:
    """Inputs of block 0 for every row of ``input_ids`` ([N, L]) and the arguments the model passes to blocks.

    Only the embedding layers, block 0 and the final norm run (one sequence at a time); the LM head is skipped
    by calling the model's backbone (``model.base_model``). The hidden states are stored in the model's dtype on
    its device: N x L x H values, the one activation buffer pruning keeps besides the dense-output buffer.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ZolmError(f"calibration ids must be a non-empty [N, L] tensor, got shape {tuple(input_ids.shape)}")
    backbone = getattr(model, "base_model", model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = module_device(embeddings if embeddings is not None else model)  # a sharded model: the first shard
    hidden = None
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            captured.update(hidden=args[0], args=args[1:], kwargs=dict(kwargs), key=None)
        else:
            kw = dict(kwargs)
            captured.update(hidden=kw.pop("hidden_states"), args=(), kwargs=kw, key="hidden_states")

    with _only_first_block(model) as first:
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for i in range(input_ids.shape[0]):
                captured.clear()
                backbone(input_ids=input_ids[i:i + 1].to(device), use_cache=False)
                if "hidden" not in captured:
                    raise ZolmError(f"{type(model).__name__} never called its first decoder block")
                if hidden is None:
                    hidden = torch.empty((input_ids.shape[0], *captured["hidden"].shape[1:]),
                                         dtype=captured["hidden"].dtype, device=captured["hidden"].device)
                    args, kwargs, key = captured["args"], captured["kwargs"], captured["key"]
                hidden[i] = captured["hidden"][0]
        finally:
            handle.remove()
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return BlockInputs(hidden, args, kwargs, key)


# --------------------------------------------------------------------------- default targets, by structure
KINDS = ("all", "attention", "mlp")


def block_groups(block: nn.Module) -> tuple[list[str], list[str]]:
    """``(attention, mlp)``: the block's linear layers by name inside it, split by the child module holding them.

    The children of a block that hold linear layers come in execution order (attention, then MLP, in every
    transformers decoder); a child whose name says attention (``self_attn``, ``attn``, ``attention``) is the
    attention part, else the first such child is; every other child is MLP (OPT's ``fc1``/``fc2`` sit in the
    block directly). Names: ``self_attn.q_proj``, ``mlp.down_proj``, ``attn.c_attn``, ``fc1``...
    """
    layers = linear_layers(block)
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(name.split(".", 1)[0], []).append(name)
    attn = [g for g in groups if "att" in g.lower()] or [next(iter(groups))]
    return ([n for g in attn for n in groups[g]], [n for g in groups if g not in attn for n in groups[g]])


def default_targets(model: nn.Module, kind: str = "all") -> list[str]:
    """Leaf names of the decoder blocks' linear (or Conv1D) layers: ``all``, the ``attention`` or the ``mlp`` ones,
    in block order without repeats (Llama ``q_proj, k_proj, ...``, GPT-2 ``c_attn, c_proj, c_fc``)."""
    if kind not in KINDS:
        raise ZolmError(f"unknown target kind {kind!r}; valid: {', '.join(KINDS)}")
    attn, mlp = block_groups(decoder_blocks(model)[0])
    names = {"all": attn + mlp, "attention": attn, "mlp": mlp}[kind]
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def block_linear_names(model: nn.Module, kind: str = "all") -> list[str]:
    """Full module names of the chosen linear layers of every decoder block (``model.layers.0.self_attn.q_proj``)."""
    if kind not in KINDS:
        raise ZolmError(f"unknown target kind {kind!r}; valid: {', '.join(KINDS)}")
    prefix, blocks = find_block_list(model)
    out = []
    for i, block in enumerate(blocks):
        attn, mlp = block_groups(block)
        out += [f"{prefix}.{i}.{n}" for n in {"all": attn + mlp, "attention": attn, "mlp": mlp}[kind]]
    return out


def lora_targets(model: nn.Module) -> list[str]:
    """LoRA's default target modules (MeZO / LoRA: the query and value projections) found by structure.

    Separate projections: the attention layers named ``q*`` and ``v*`` (Llama, Mistral, Qwen2, Gemma, OPT
    ``q_proj, v_proj``). A fused projection: the attention layer with the most outputs (GPT-2 ``c_attn``, GPT-NeoX
    ``query_key_value``, Phi-3 ``qkv_proj``), i.e. not the output projection.
    """
    block = decoder_blocks(model)[0]
    attn, _ = block_groups(block)
    layers = linear_layers(block)
    leaves = {n: n.rsplit(".", 1)[-1] for n in attn}
    qv = [leaves[n] for n in attn if leaves[n][:1].lower() in ("q", "v") and "qkv" not in leaves[n].lower()]
    if len(qv) == 2:
        return sorted(qv, key=lambda n: n[0].lower() != "q")  # query first (OPT registers k, v, q)
    widest = max(attn, key=lambda n: layers[n].out_features if is_low_bit_linear(layers[n])
                 else out_in(layers[n]).shape[0])
    return [leaves[widest]]


def tt_placement(model: nn.Module) -> list[str]:
    """AdaZeta's TT adapter placement found by structure: an input adapter on every MLP layer but the last one
    of the block, an output adapter on the last (Llama ``gate_proj:input up_proj:input down_proj:output``, OPT
    ``fc1:input fc2:output``, GPT-2 ``mlp.c_fc:input mlp.c_proj:output``). Patterns are block-relative names, so a
    leaf shared with attention (GPT-2 ``c_proj``) keeps its parent."""
    _, mlp = block_groups(decoder_blocks(model)[0])
    if not mlp:
        raise ZolmError(f"{type(model).__name__}: no MLP linear layers in the decoder blocks for TT adapters")
    attn_leaves = {n.rsplit(".", 1)[-1] for n in block_groups(decoder_blocks(model)[0])[0]}

    def pattern(name: str) -> str:
        leaf = name.rsplit(".", 1)[-1]
        return re.escape(name if leaf in attn_leaves else leaf)

    return [f"{pattern(n)}:input" for n in mlp[:-1]] + [f"{pattern(mlp[-1])}:output"]
