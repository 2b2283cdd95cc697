"""FinetuneConfig: every knob of a fine-tuning run, validated up front, saved next to every result."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from zolm.errors import ZolmError, unknown
from zolm.train import adapter_options
from zolm.zo.precision import check_half_mode

MASK_METHODS = ("mazo", "mezo-random-mask", "mezo-magnitude-mask")  # masked ZO (docs/mazo.md)
METHODS = ("mezo", "fo-adamw", "fo-sgd", "fo-lora", "quzo", "quant-mezo", "fo-ste", "adazeta", "mezo-lora",
           "fo-tt") + MASK_METHODS
# Learning rates used when none is given (papers.md section 10, at 135M on CPU).
DEFAULT_LR = {"mezo": 1e-6, "fo-adamw": 1e-5, "fo-sgd": 1e-3, "fo-lora": 1e-4, "quzo": 1e-6, "quant-mezo": 1e-6,
              "fo-ste": 1e-5, **dict.fromkeys(MASK_METHODS, 1e-5)}
DEFAULT_LR.update({"adazeta": 1e-4, "mezo-lora": 1e-4, "fo-tt": 1e-3})  # AdaZeta (docs/adazeta.md)
DEFAULT_EPS = {"mezo-lora": 1e-2}  # ZO perturbation scale when none is given (MeZO App. E); others 1e-3
QUANT_METHODS = ("quzo", "quant-mezo", "fo-ste")
MAZO_CURVATURES = ("fisher", "activation")
SCHEDULES = ("constant", "linear")


@dataclass
class FinetuneConfig:
    """Configuration of ``zolm finetune`` (also accepted as a YAML or JSON file)."""

    out: str = ""
    model: str = "smollm2-135m"
    task: str = "sst2"  # one task, or a comma-separated mixture ("sst2,rte,boolq")
    task_weights: list[float] = field(default_factory=list)  # mixture proportions (default: uniform)
    method: str = "mezo"
    data_dir: str | None = None
    dtype: str = "float32"
    device: str = "cpu"  # "cuda", "cuda:1", ... (ignored when device_map is set)
    device_map: str | None = None  # e.g. "auto": shard a large model over devices (accelerate)
    steps: int = 1000
    batch_size: int = 16  # the global batch: split over torchrun workers and grad_accum micro-batches
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR[method]
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    # zeroth-order
    eps: float | None = None  # None: DEFAULT_EPS[method], else 1e-3
    queries: int = 1
    sampler: str = "ih4"
    half_mode: str = "exact"  # ZO on bf16/fp16 weights: exact | lean | inplace (zolm.zo.precision)
    # which parameters train (regular expressions on parameter names; empty: all)
    train_params: list[str] = field(default_factory=list)
    freeze_params: list[str] = field(default_factory=list)
    keep_sparsity: bool = True  # pruned tensors (>= 10% exact zeros) keep their zeros (zolm.train.sparsity)
    # first order
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # quantized training (quzo, quant-mezo: ZO on low-bit codes; fo-ste: straight-through first order)
    bits: int = 4  # weight bits: 4 or 8 (int); fp8 is 8
    format: str = "int"  # int or fp8
    fp8_variant: str = "e4m3"
    group_size: int | None = None  # None: 32 for int4, per output channel otherwise
    embed_bits: int | None = 8  # token embedding (and tied LM head) bits; None keeps them float
    fp16_scales: bool | None = None  # scales rounded to float16 (GGUF-exact); None: on for int with groups of 32
    act_bits: int | None = None  # fake-quantize layer inputs to this many bits
    perturb_bits: int | None = None  # QuZO perturbation bits (None: 4 for quzo, 0 = unquantized for quant-mezo)
    two_draws: bool = True  # QuZO: independent roundings for the perturbation and the update direction
    update_rounding: str | None = None  # stochastic (quzo default) or nearest (quant-mezo default)
    # masked ZO: mazo, mezo-random-mask, mezo-magnitude-mask (docs/mazo.md; defaults papers.md 5.3 and 10)
    mask_ratio: float = 0.05  # rho: share of each row's weights that ZO perturbs and updates, in (0, 1]
    mask_params: list[str] = field(default_factory=list)  # maskable weights (regexes); empty: block linears
    mazo_alpha: float = 1.0  # weight of S_greedy = g^2
    mazo_beta: float = 0.0  # weight of the magnitude term |W|
    mazo_curvature: str = "fisher"  # h in S_global: "fisher" (mean of g_b^2) or "activation" (mean x_j^2)
    mazo_damping: float = 1e-8  # lambda = mazo_damping * mean(h)
    mazo_row_eps: float = 1e-12  # row normalisation S / (max_j S + mazo_row_eps)
    mazo_term_norm: bool = False  # row-normalise each term before weighting them (zolm option, not 5.3)
    mazo_calib_examples: int = 64  # calibration examples per task (its first training examples)
    mazo_calib_batch_size: int = 8  # one backward pass per calibration mini-batch
    # data (MeZO protocol)
    num_train: int = 1000
    num_dev: int | None = None
    num_test: int = 1000
    max_length: int = 1024
    data_seed: int = 0
    seed: int = 0
    # evaluation and checkpoints
    eval_every: int = 200  # 0: evaluate on dev only at the end
    checkpoint_every: int | None = None  # None: same as eval_every
    eval_batch_size: int = 16
    eval_before: bool = True
    # ---- AdaZeta and adapter methods (adazeta, mezo-lora, fo-tt; docs/adazeta.md) ----
    tt_rank: int = 5
    tt_bottleneck: int = 64
    tt_modes: int = 3  # TT modes per side of each TT layer
    tt_hidden_modes: list[int] = field(default_factory=list)  # empty: factorise the layer's size (balanced)
    tt_activation: str = "relu"  # relu (paper) or identity (mergeable)
    tt_scaling: float = 1.0
    tt_bias: bool = True
    tt_placement: list[str] = field(default_factory=list)  # "module_pattern:input|output"; empty: by architecture
    q_schedule: str = "adaptive"  # adazeta queries per step: adaptive (Q_e) or fixed (--queries)
    q_alpha: float = 0.85
    q_beta: float | None = None  # None: fitted so that Q reaches q_target at the last epoch (AdaZeta code)
    q_max: int = 20
    q_target: float = 20.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise unknown("method", self.method, METHODS)
        check_half_mode(self.half_mode)
        if self.lr_schedule not in SCHEDULES:
            raise unknown("lr schedule", self.lr_schedule, SCHEDULES)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.eps is None:
            self.eps = DEFAULT_EPS.get(self.method, 1e-3)
        for name in ("steps", "batch_size", "grad_accum", "queries", "eval_batch_size", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ZolmError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ZolmError(f"{name} must be a positive number, got {v}")
        if self.weight_decay < 0 or self.eval_every < 0:
            raise ZolmError("weight_decay and eval_every must be >= 0")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ZolmError(f"task must name one or more distinct tasks, got {self.task!r}")
        if self.task_weights and len(self.task_weights) != len(self.tasks):
            raise ZolmError(f"task_weights has {len(self.task_weights)} values for {len(self.tasks)} tasks")
        if self.method in QUANT_METHODS:
            self.quant_config()  # validates bits / format / group size
            if self.update_rounding not in (None, "stochastic", "nearest"):
                raise unknown("update rounding", self.update_rounding, ("nearest", "stochastic"))
        if self.checkpoint_every is None:
            self.checkpoint_every = self.eval_every
        if self.checkpoint_every < 0:
            raise ZolmError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        adapter_options.validate(self)
        self._check_mask_options()

    def quant_config(self):
        """The QuantConfig of the quantized methods (imported lazily: zolm.quant is optional here)."""
        from zolm.quant.formats import QuantConfig, QuantFormat

        group = self.group_size if self.group_size is not None else (32 if self.format == "int" and self.bits == 4
                                                                       else None)
        bits = 8 if self.format == "fp8" else self.bits
        fmt = QuantFormat(self.format, bits, self.fp8_variant, group, self.fp16_scales)
        return QuantConfig(weight=fmt, embed_bits=self.embed_bits,
                           act_bits=self.act_bits)

    def _check_mask_options(self) -> None:
        """Masked-ZO options, checked for every method so that a bad value fails before any run starts."""
        r = self.mask_ratio
        if not (isinstance(r, int | float) and math.isfinite(r) and 0 < r <= 1):
            raise ZolmError(f"mask_ratio must be in (0, 1], got {r}")
        for name in ("mazo_alpha", "mazo_beta", "mazo_damping", "mazo_row_eps"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ZolmError(f"{name} must be a finite number >= 0, got {v}")
        if self.mazo_curvature not in MAZO_CURVATURES:
            raise unknown("mazo_curvature", self.mazo_curvature, MAZO_CURVATURES)
        for name in ("mazo_calib_examples", "mazo_calib_batch_size"):
            if getattr(self, name) < 1:
                raise ZolmError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def tasks(self) -> list[str]:
        return [t.strip() for t in self.task.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(data) - valid)
        if bad:
            raise ZolmError(f"unknown config key(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> FinetuneConfig:
        """Read a YAML (.yaml/.yml) or JSON file; ``overrides`` (not None) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise ZolmError(f"no such config file: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - yaml and json raise different types
            raise ZolmError(f"{path}: cannot parse config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ZolmError(f"{path}: a config file must hold a mapping of keys to values")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def defaults() -> dict[str, Any]:
    """Field defaults (for the CLI's help text)."""
    out = {}
    for f in fields(FinetuneConfig):
        out[f.name] = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return out
