"""Put TT adapters into a transformers model, find them, merge them, take them out (PEFT-style wrapping).

Placement (AdaZeta code, papers.md 6.2): an *input* adapter transforms a linear layer's input
(x -> W Adapter(x)), an *output* adapter its output (Adapter(W x)). Defaults, detected from module names:

    Llama-like (gate_proj, up_proj, down_proj):  gate_proj:input, up_proj:input, down_proj:output
    OPT-like (fc1, fc2):                          fc1:input, fc2:output

Each matched ``nn.Linear`` is replaced by a :class:`TTAdapterLinear` holding it unchanged as ``base_layer``
and the adapter as ``tt_adapter``; adapter parameter names therefore contain ``.tt_adapter.``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from zolm.adapters.tt import ACTIVATIONS, INITS, TTAdapter, factorize
from zolm.blocks import is_linear, out_in, tt_placement
from zolm.errors import ZolmError
from zolm.quant.linear import QuantLinear

ADAPTER_PATTERN = r"\.tt_adapter\."  # a regular expression matching every adapter parameter name
SIDES = ("input", "output")
PRESETS = {
    "llama": ["gate_proj:input", "up_proj:input", "down_proj:output"],
    "opt": ["fc1:input", "fc2:output"],
}


@dataclass
class TTAdapterConfig:
    """Shape, placement and initialisation of the TT adapters (AdaZeta defaults, papers.md 6.2 and 10).

    Args:
        rank: TT rank r of every core boundary.
        bottleneck: adapter bottleneck size b.
        modes: number o of TT modes each side of a TT layer is factorised into.
        activation: "relu" (paper) or "identity" (linear adapter; the only kind that merges exactly).
        scaling: s in x + s * TT_up(act(TT_down(x))).
        bias: TT layers with a bias (paper: yes).
        placement: "module_pattern:input|output" entries; a pattern is a regular expression matched against
            the end of a module's dotted name. Empty: detected from the model (``PRESETS``).
        hidden_modes: explicit factorisation of the hidden side (default: :func:`factorize`).
        bottleneck_modes: explicit factorisation of the bottleneck (default: :func:`factorize`).
        seed: seed of the initialisation (same seed, same adapters).
        init: "zero-up" (the adapter starts as the identity) or "reference" (AdaZeta's code); see TTAdapter.
    """

    rank: int = 5
    bottleneck: int = 64
    modes: int = 3
    activation: str = "relu"
    scaling: float = 1.0
    bias: bool = True
    placement: list[str] = field(default_factory=list)
    hidden_modes: list[int] | None = None
    bottleneck_modes: list[int] | None = None
    seed: int = 0
    init: str = "zero-up"

    def __post_init__(self) -> None:
        for name in ("rank", "bottleneck", "modes"):
            if getattr(self, name) < 1:
                raise ZolmError(f"TT adapter {name} must be >= 1, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ZolmError(f"unknown adapter activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ZolmError(f"unknown adapter init {self.init!r}; valid: {', '.join(INITS)}")
        if not math.isfinite(self.scaling):
            raise ZolmError(f"adapter scaling must be a finite number, got {self.scaling}")
        for entry in self.placement:
            parse_placement(entry)
        if self.bottleneck_modes and math.prod(self.bottleneck_modes) != self.bottleneck:
            raise ZolmError(f"bottleneck modes {self.bottleneck_modes} multiply to "
                            f"{math.prod(self.bottleneck_modes)}, not the bottleneck {self.bottleneck}")
        if self.hidden_modes and self.bottleneck_modes and len(self.hidden_modes) != len(self.bottleneck_modes):
            raise ZolmError(f"hidden modes {self.hidden_modes} and bottleneck modes {self.bottleneck_modes} need "
                            "the same number of factors")
        if any(m < 2 for m in (self.hidden_modes or []) + (self.bottleneck_modes or [])):
            raise ZolmError("TT modes must be >= 2")

    def modes_for(self, size: int) -> tuple[list[int], list[int]]:
        """(hidden modes, bottleneck modes) of an adapter on a side of ``size`` features."""
        if self.hidden_modes:
            if math.prod(self.hidden_modes) != size:
                raise ZolmError(f"hidden modes {self.hidden_modes} multiply to {math.prod(self.hidden_modes)}, "
                                f"but the adapted layer side has {size} features")
            hidden = list(self.hidden_modes)
        else:
            hidden = factorize(size, self.modes)
        bottleneck = list(self.bottleneck_modes) if self.bottleneck_modes else factorize(self.bottleneck, len(hidden))
        if len(bottleneck) != len(hidden):
            raise ZolmError(f"hidden modes {hidden} and bottleneck modes {bottleneck} differ in length")
        return hidden, bottleneck


def parse_placement(entry: str, what: str = "adapter placement") -> tuple[str, str]:
    """'gate_proj:input' -> ('gate_proj', 'input'), with a one-line error (naming ``what``) for anything else."""
    pattern, sep, side = entry.rpartition(":")
    if not sep or not pattern or side not in SIDES:
        raise ZolmError(f"{what} {entry!r} must look like 'module_pattern:input' or 'module_pattern:output'")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ZolmError(f"{what} {entry!r}: bad regular expression ({e})") from None
    return pattern, side


def default_placement(model: nn.Module) -> list[str]:
    """The AdaZeta placement for the model's architecture, found from its decoder blocks (zolm.blocks.tt_placement:
    input adapters on the MLP's first layers, an output adapter on its last; ``PRESETS`` for Llama and OPT)."""
    try:
        return tt_placement(model)
    except ZolmError:  # no decoder blocks: known module names, if any
        pass
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for preset, names in (("llama", {"gate_proj", "up_proj", "down_proj"}), ("opt", {"fc1", "fc2"})):
        if names <= leaves:
            return list(PRESETS[preset])
    raise ZolmError(f"no default TT adapter placement for {type(model).__name__} (no decoder blocks with MLP "
                    "layers); give the placement as 'module_pattern:input|output' entries")


def features(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an nn.Linear, a GPT-2 Conv1D (weight ``[in, out]``) or a QuantLinear."""
    if isinstance(layer, QuantLinear):
        return layer.out_features, layer.in_features
    out_f, in_f = out_in(layer).shape
    return out_f, in_f


class TTAdapterLinear(nn.Module):
    """A linear layer with a TT adapter on its input or its output; ``base_layer`` is left untouched."""

    adapter_names = ("tt_adapter",)

    def __init__(self, base_layer: nn.Linear, side: str, adapter: TTAdapter):
        super().__init__()
        if side not in SIDES:
            raise ZolmError(f"adapter side must be one of {', '.join(SIDES)}, got {side!r}")
        self.base_layer, self.side, self.tt_adapter = base_layer, side, adapter
        self.out_features, self.in_features = features(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "input":
            return self.base_layer(self.tt_adapter(x))
        return self.tt_adapter(self.base_layer(x))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (identity-activation adapters only).

        With Adapter(v) = A v + c (see :meth:`TTAdapter.affine`) and the base y = W x + b:
            input side:   W' = W A,  b' = W c + b
            output side:  W' = A W,  b' = A b + c
        computed in float64 and rounded once to the base layer's dtype. The new layer has a bias when the
        base had one or c is non-zero.
        """
        a, c = self.tt_adapter.affine()
        w = out_in(self.base_layer).double()
        b = self.base_layer.bias.double() if self.base_layer.bias is not None else None
        if self.side == "input":
            w_new = w @ a
            b_new = w @ c + (b if b is not None else 0.0)
        else:
            w_new = a @ w
            b_new = (a @ b if b is not None else 0.0) + c
        has_bias = b is not None or bool(torch.any(c != 0))
        dtype, device = self.base_layer.weight.dtype, self.base_layer.weight.device
        if isinstance(self.base_layer, nn.Linear):
            out = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=device, dtype=dtype)
        else:  # Conv1D stays Conv1D (weight [in, out]), so the merged model loads in plain transformers
            out = type(self.base_layer)(self.out_features, self.in_features).to(device=device, dtype=dtype)
            if not has_bias:
                out.bias = None
        out_in(out).copy_(w_new.to(dtype))
        if has_bias:
            out.bias.copy_(b_new.to(dtype))
        out.weight.requires_grad_(self.base_layer.weight.requires_grad)
        return out


def layer_device(layer: nn.Module) -> torch.device:
    """The device of a layer's first parameter or buffer (a QuantLinear holds its codes in buffers)."""
    return next(x.device for x in (*layer.parameters(), *layer.buffers()) if x is not None)


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def find_targets(model: nn.Module, placement: list[str],
                 filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[tuple[str, str]]:
    """(module name, side) of every module the placement selects, in module order."""
    rules = [(re.compile(rf"(?:^|\.)(?:{p})$"), side) for p, side in map(parse_placement, placement)]
    out = []
    for name, module in model.named_modules():
        side = next((s for r, s in rules if r.search(name)), None)
        if side is None or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if isinstance(module, TTAdapterLinear):
            raise ZolmError(f"{name} already has a TT adapter")
        if not (is_linear(module) or isinstance(module, QuantLinear)):
            raise ZolmError(f"adapter placement selects {name}, a {type(module).__name__}; TT adapters wrap "
                            "nn.Linear, Conv1D (or zolm QuantLinear) layers only")
        out.append((name, side))
    if not out:
        raise ZolmError(f"adapter placement {placement} matches no module of {type(model).__name__}")
    return out


def add_tt_adapters(model: nn.Module, config: TTAdapterConfig | None = None,
                    filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Wrap the selected linear layers of ``model`` in place; freeze everything but the adapters.

    Adapters are float32 whatever the base dtype, on the base layer's device, and initialised from one
    ``torch.Generator`` seeded with ``config.seed`` in module order, so the same config gives the same
    adapters (replay relies on it). Sizes come from each wrapped layer (``in_features`` for an input
    adapter, ``out_features`` for an output one), i.e. from the model's own hidden size. Returns the names of
    the wrapped modules.
    """
    config = config or TTAdapterConfig()
    placement = config.placement or default_placement(model)
    targets = find_targets(model, placement, filter_fn)
    shapes = {}
    for name, side in targets:  # validate every shape before touching the model
        base = model.get_submodule(name)
        out_f, in_f = features(base)
        shapes[name] = config.modes_for(in_f if side == "input" else out_f)
    gen = torch.Generator().manual_seed(config.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, side in targets:
        base = model.get_submodule(name)
        hidden, bottleneck = shapes[name]
        adapter = TTAdapter(hidden, bottleneck, config.rank, config.activation, config.scaling, config.bias, gen,
                            config.init)
        device = layer_device(base)
        _set(model, name, TTAdapterLinear(base, side, adapter.to(device=device)))
    model.zolm_adapter_config = copy.deepcopy(config)
    model.zolm_adapter_config.placement = list(placement)
    return [n for n, _ in targets]


def adapter_layers(model: nn.Module) -> dict[str, TTAdapterLinear]:
    """{module name: wrapper} of every TT-adapted layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TTAdapterLinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{parameter name: parameter} of every TT adapter of ``model`` (the only trainable tensors)."""
    return {n: p for n, p in model.named_parameters() if re.search(ADAPTER_PATTERN, n)}


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put every wrapped layer's untouched ``base_layer`` back (drops the adapters); returns ``model``."""
    for name, wrapper in adapter_layers(model).items():
        _set(model, name, wrapper.base_layer)
    if hasattr(model, "zolm_adapter_config"):
        del model.zolm_adapter_config
    return model


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold identity-activation adapters into the base weights (see :meth:`TTAdapterLinear.merged`).

    The result is a plain transformers model that ``save_pretrained`` writes and ``from_pretrained``
    reloads. When a merge gives a bias to a layer whose architecture has none (an adapter with biases on
    Llama's bias-free MLP), the config's bias flag for those layers (e.g. ``mlp_bias``) is switched on and
    the other layers it governs get zero biases; if no flag can express it, ZolmError. A ReLU adapter
    raises ZolmError (it is not linear).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ZolmError("the model has no TT adapters to merge")
    merged = {name: w.merged() for name, w in layers.items()}  # all or nothing: fails before any change
    added = [f"{name}.bias" for name, w in layers.items()
             if w.base_layer.bias is None and merged[name].bias is not None]
    for name, lin in merged.items():
        _set(model, name, lin)
    if hasattr(model, "zolm_adapter_config"):
        del model.zolm_adapter_config
    if added and hasattr(model, "config"):
        _let_config_hold(model, added)
    return model


def _state_names(cls: type, config) -> set[str]:
    with torch.device("meta"):
        return set(cls(config).state_dict())


def _let_config_hold(model: nn.Module, added: list[str]) -> None:
    """Switch on a boolean ``*bias*`` config flag under which the architecture has the ``added`` biases."""
    have = set(model.state_dict())
    if have <= _state_names(type(model), model.config):
        return
    flags = [k for k, v in model.config.to_dict().items() if "bias" in k and v is False]
    for flag in flags:
        trial = copy.deepcopy(model.config)
        setattr(trial, flag, True)
        expected = _state_names(type(model), trial)
        missing = expected - have
        if set(added) <= expected and have <= expected and all(n.endswith(".bias") for n in missing):
            for n in sorted(missing):
                layer = model.get_submodule(n[: -len(".bias")])
                layer.bias = nn.Parameter(torch.zeros(out_in(layer).shape[0], dtype=layer.weight.dtype,
                                                      device=layer.weight.device), requires_grad=False)
            setattr(model.config, flag, True)
            return
    raise ZolmError(f"merging gives {added[0]} a bias that {type(model).__name__} cannot store; train adapters "
                    "without bias to merge them, or keep them as an adapter directory")
