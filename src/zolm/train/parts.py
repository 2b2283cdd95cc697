"""The four parts a fine-tuning method is composed of, each a small config validated on construction.

    base       BaseWeights    what the weights are: float (any dtype), a fake-quantized float master, or zolm
                              low-bit codes (INT8 / INT4 / FP8); a pruned model keeps its zeros under every part
    train      TrainableSet   what moves: all weights (by name pattern), LoRA, TT adapters, or a mask
                              (importance = MaZO, random, magnitude)
    estimator  Estimator      the gradient: SPSA (MeZO) with n queries, a fixed or adaptive query schedule
                              (AdaZeta), perturbations quantized by two independent stochastic roundings (QuZO),
                              update rounding where the trained tensors are low-bit codes; or backpropagation
    optim      Optimizer      the step: SGD (ZO-SGD with SPSA) or AdamW, learning rate and its schedule

``check_composition`` refuses, with one line saying why, every combination that makes no sense; the paper
methods are named presets of these parts (zolm/train/presets, docs/methods.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from zolm.errors import ZolmError
from zolm.utils.configs import check_choices, option
from zolm.utils.patterns import compile_patterns
from zolm.zo.precision import HALF_MODES

BASE_KINDS = ("float", "fake-quant", "low-bit")
TRAIN_KINDS = ("all", "lora", "tt", "mask")
MASK_KINDS = ("importance", "random", "magnitude")
ESTIMATORS = ("spsa", "backprop")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "linear")
QUERY_SCHEDULES = ("fixed", "adaptive")


def _flag(obj, name: str) -> str:
    """The name a user types for field ``name`` of a part (its CLI flag / flat config key)."""
    f = next(f for f in fields(obj) if f.name == name)
    return f.metadata.get("flag") or name


def _at_least(obj, names: tuple[str, ...], low: float) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and not (math.isfinite(v) and v >= low):
            raise ZolmError(f"{_flag(obj, name)} must be >= {low:g}, got {v}")


@dataclass
class BaseWeights:
    """The base model's weights (key ``base``)."""

    kind: str = option("float", "base weights: float (the model's dtype), fake-quant (float masters, the forward "
                       "sees their quantized values) or low-bit (zolm INT8/INT4/FP8 codes)", flag="base",
                       choices=BASE_KINDS)
    bits: int = option(4, "quantized base: weight bits, 4 or 8 (int); fp8 is 8")
    format: str = option("int", "quantized base: int or fp8", choices=("int", "fp8"))
    fp8_variant: str = option("e4m3", "quantized base: FP8 variant (e4m3 or e5m2)")
    group_size: int | None = option(None, "quantized base: weights per scale (default 32 for int4, per output "
                                    "channel otherwise)")
    embed_bits: int | None = option(8, "low-bit base: token embedding (and tied LM head) bits; null keeps them float")
    fp16_scales: bool | None = option(None, "quantized base: scales rounded to float16 (GGUF-exact; default on for "
                                      "int with groups of 32)")
    act_bits: int | None = option(None, "quantized base: fake-quantize layer inputs to this many bits")
    clip: str | None = option(None, "quantized base: scale search, mse (clip each group's range to minimise its "
                              "error), act (the error weighted by calibration activations: zolm quantize and "
                              "recipes) or none (absmax); default mse for int4, none otherwise",
                              choices=("mse", "act", "none"))
    fake_scales: str = option("dynamic", "fake-quant base: scales follow the masters every forward (dynamic, STE's "
                              "usual) or are fixed at the start (fixed: QuZO's float-master runs)",
                              choices=("dynamic", "fixed"))
    keep_sparsity: bool = option(True, "pruned tensors (>= 10 percent exact zeros) keep their zeros under every part")

    def __post_init__(self) -> None:
        check_choices(self, "base")
        if self.kind != "float":
            self.quant_config()  # validates bits, format, group size

    def quant_config(self):
        """The zolm QuantConfig of a quantized base (zolm.quant is imported lazily: it needs torch)."""
        from zolm.quant.formats import QuantConfig, QuantFormat

        group = self.group_size if self.group_size is not None else (32 if self.format == "int" and self.bits == 4
                                                                       else None)
        bits = 8 if self.format == "fp8" else self.bits
        fmt = QuantFormat(self.format, bits, self.fp8_variant, group, self.fp16_scales, self.clip)
        return QuantConfig(weight=fmt, embed_bits=self.embed_bits, act_bits=self.act_bits)


@dataclass
class LoRAOptions:
    """peft LoRA adapters (key ``train.lora``)."""

    r: int = option(8, "LoRA rank", flag="lora_r")
    alpha: int = option(16, "LoRA alpha (scaling alpha / r)", flag="lora_alpha")
    targets: list[str] = option([], "LoRA target module names (default by architecture: the query and value "
                                "projections, e.g. Llama/OPT q_proj v_proj, GPT-2 c_attn, NeoX query_key_value)",
                                flag="lora_targets")

    def __post_init__(self) -> None:
        _at_least(self, ("r",), 1)


@dataclass
class TTOptions:
    """Tensor-train adapters (key ``train.tt``; AdaZeta, docs/adazeta.md)."""

    rank: int = option(5, "TT rank of the adapters", flag="tt_rank")
    bottleneck: int = option(64, "TT adapter bottleneck size", flag="tt_bottleneck")
    modes: int = option(3, "TT modes each side of a TT layer is factorised into", flag="tt_modes")
    hidden_modes: list[int] = option([], "explicit factorisation of the adapted side (default: balanced factors)",
                                     flag="tt_hidden_modes")
    activation: str = option("relu", "adapter activation: relu (paper) or identity (mergeable into the weights)",
                             flag="tt_activation", choices=("relu", "identity"))
    scaling: float = option(1.0, "adapter scaling s in x + s * TT_up(act(TT_down(x)))", flag="tt_scaling")
    bias: bool = option(True, "TT layers with a bias", flag="tt_bias")
    init: str = option("zero-up", "adapter initialisation: zero-up (TT_up's last core and bias zero: the adapter "
                       "starts as the identity; zolm default) or reference (AdaZeta's code)", flag="tt_init",
                       choices=("zero-up", "reference"))
    placement: list[str] = option([], "where adapters go, module_pattern:input|output (default by architecture: "
                                  "Llama gate_proj:input up_proj:input down_proj:output; OPT fc1:input fc2:output)",
                                  flag="tt_placement")

    def __post_init__(self) -> None:
        check_choices(self, "train.tt")
        _at_least(self, ("rank", "bottleneck", "modes"), 1)
        if not math.isfinite(self.scaling):
            raise ZolmError(f"train.tt.scaling must be a finite number, got {self.scaling}")
        if self.hidden_modes and (len(self.hidden_modes) != self.modes or min(self.hidden_modes) < 2):
            raise ZolmError(f"tt_hidden_modes must be {self.modes} (tt_modes) integers >= 2, got {self.hidden_modes}")
        from zolm.adapters.inject import parse_placement

        for entry in self.placement:
            parse_placement(entry, what="tt_placement entry")


@dataclass
class MaskOptions:
    """A sparse update mask (key ``train.mask``; MaZO, papers.md 5.3, docs/mazo.md)."""

    kind: str = option("importance", "mask: importance (MaZO), random, or magnitude (largest |W| per row)",
                       flag="mask_kind", choices=MASK_KINDS)
    ratio: float = option(0.05, "share rho of each row's weights that ZO perturbs and updates, in (0, 1]",
                          flag="mask_ratio")
    params: list[str] = option([], "regular expressions of maskable [out, in] weights (default: the linear layers "
                               "of the decoder blocks)", flag="mask_params")
    alpha: float = option(1.0, "MaZO: weight of the greedy importance term g^2", flag="mazo_alpha")
    beta: float = option(0.0, "MaZO: weight of the magnitude term |W|", flag="mazo_beta")
    curvature: str = option("activation", "MaZO: h in g^2/(2(h+lambda)): activation (mean x_j^2 of the layer input) "
                            "or fisher (mean squared mini-batch gradient)", flag="mazo_curvature",
                            choices=("fisher", "activation"))
    damping: float = option(1e-8, "MaZO: lambda = damping * mean(h)", flag="mazo_damping")
    row_eps: float = option(1e-12, "MaZO: per-task row normalisation S / (max_j S + eps)", flag="mazo_row_eps")
    term_norm: bool = option(False, "MaZO: row-normalise each term before weighting (zolm option, off in 5.3)",
                             flag="mazo_term_norm")
    calib_examples: int = option(64, "MaZO: calibration examples per task (its first training examples)",
                                 flag="mazo_calib_examples")
    calib_batch_size: int = option(8, "MaZO: calibration mini-batch size (one backward pass each)",
                                   flag="mazo_calib_batch_size")

    def __post_init__(self) -> None:
        check_choices(self, "train.mask")
        if not (math.isfinite(self.ratio) and 0 < self.ratio <= 1):
            raise ZolmError(f"mask_ratio must be in (0, 1], got {self.ratio}")
        _at_least(self, ("alpha", "beta", "damping", "row_eps"), 0)
        _at_least(self, ("calib_examples", "calib_batch_size"), 1)


@dataclass
class TrainableSet:
    """What training moves (key ``train``)."""

    kind: str = option("all", "trainable set: all (weights matching --train-params), lora, tt (tensor-train "
                       "adapters) or mask (a sparse mask over the block linears)", flag="trainable",
                       choices=TRAIN_KINDS)
    params: list[str] = option([], "regular expressions of parameter (or, on a low-bit base, layer) names to "
                               "train (default: all)", flag="train_params")
    freeze: list[str] = option([], "regular expressions of names to keep frozen", flag="freeze_params")
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    tt: TTOptions = field(default_factory=TTOptions)
    mask: MaskOptions = field(default_factory=MaskOptions)

    def __post_init__(self) -> None:
        check_choices(self, "train")
        compile_patterns(self.params, "--train-params")
        compile_patterns(self.freeze, "--freeze-params")
        compile_patterns(self.mask.params, "--mask-params")


@dataclass
class Estimator:
    """How the gradient is estimated (key ``estimator``)."""

    kind: str = option("spsa", "gradient estimator: spsa (zeroth order, forward passes only) or backprop",
                       flag="estimator", choices=ESTIMATORS)
    eps: float = option(1e-3, "ZO perturbation scale")
    queries: int = option(1, "ZO queries (SPSA estimates) per step (the fixed schedule)")
    sampler: str = option("ih4", "ZO perturbation distribution: ih4 (Irwin-Hall ~ Gaussian) or rademacher",
                          choices=("ih4", "rademacher"))
    half_mode: str = option("exact", "ZO on bfloat16/float16 weights: exact (float32 masters, +4 bytes per trained "
                            "weight), lean (virtual perturbation, stochastically rounded updates) or inplace",
                            choices=HALF_MODES)
    schedule: str = option("fixed", "ZO queries per step: fixed (--queries) or adaptive (AdaZeta: Q_e = "
                           "min(max(floor(q_alpha e^q_beta), 1), q_max) at epoch e)", flag="q_schedule",
                           choices=QUERY_SCHEDULES)
    q_alpha: float = option(0.85, "multiplier of the adaptive query schedule")
    q_beta: float | None = option(None, "exponent of the adaptive schedule (default: fitted so Q reaches q_target "
                                  "at the last epoch)")
    q_max: int = option(20, "cap of the adaptive query schedule (paper 20; AdaZeta's script 15)")
    q_target: float = option(20.0, "Q at the last epoch when q_beta is fitted")
    perturb_bits: int = option(0, "quantize ZO perturbations to this many bits by stochastic rounding (QuZO: 4; "
                               "0: unquantized)")
    two_draws: bool = option(True, "quantized perturbations: independent roundings for the perturbation and the "
                             "update direction (QuZO)")
    update_rounding: str | None = option(None, "low-bit codes: rounding of each update onto the grid, stochastic "
                                         "(default) or nearest (naive)", choices=("stochastic", "nearest"))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ZolmError(f"eps must be a positive number, got {self.eps}")
        _at_least(self, ("queries", "q_max"), 1)
        if not 0 <= self.perturb_bits <= 8:
            raise ZolmError(f"perturb_bits must be 0 (no quantization) or 1..8, got {self.perturb_bits}")
        check_choices(self, "estimator")
        from zolm.zo.adazeta import QuerySchedule  # validates q_alpha, q_beta, q_target

        QuerySchedule(kind=self.schedule, queries=self.queries, alpha=self.q_alpha, beta=self.q_beta,
                      q_max=self.q_max, q_target=self.q_target, total_epochs=1.0)


@dataclass
class Optimizer:
    """How an estimate moves the weights (key ``optim``)."""

    kind: str = option("sgd", "optimiser: sgd (ZO-SGD with spsa) or adamw (backprop only)", flag="optimizer",
                       choices=OPTIMIZERS)
    lr: float = option(1e-6, "learning rate (default per method)")
    lr_schedule: str = option("constant", "constant or linear (decays to 0 at the last step)", choices=SCHEDULES)
    weight_decay: float = option(0.0, "weight decay")
    max_grad_norm: float = option(1.0, "backprop: clip the gradient norm (0: off)")

    def __post_init__(self) -> None:
        check_choices(self, "optim")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ZolmError(f"lr must be a positive number, got {self.lr}")
        _at_least(self, ("weight_decay", "max_grad_norm"), 0)


def trains_codes(base: BaseWeights, train: TrainableSet) -> bool:
    """True when the trained tensors are the low-bit codes themselves (QuZO's true low-bit mode)."""
    return base.kind == "low-bit" and train.kind == "all"


def check_composition(base: BaseWeights, train: TrainableSet, est: Estimator, opt: Optimizer) -> None:
    """Refuse, with one line that says why, a combination of parts that makes no sense (or is not built)."""
    zo = est.kind == "spsa"
    if zo and opt.kind != "sgd":
        raise ZolmError("the spsa estimator steps with ZO-SGD (optimizer sgd); adamw needs backprop gradients")
    if not zo:
        if est.perturb_bits:
            raise ZolmError("perturb_bits quantizes ZO perturbations; backprop has none (use estimator spsa)")
        if est.schedule == "adaptive":
            raise ZolmError("the adaptive query schedule is a ZO schedule; backprop makes one pass per step")
        if trains_codes(base, train):
            raise ZolmError("backprop cannot train low-bit codes (no gradient through rounding): use base fake-quant "
                            "(straight-through estimator) or LoRA / TT adapters over the low-bit base")
    if est.update_rounding is not None and not trains_codes(base, train):
        raise ZolmError("update_rounding rounds updates onto the low-bit grid; it applies only when the trained "
                        "tensors are low-bit codes (base low-bit, trainable all)")
    if base.kind == "fake-quant" and train.kind != "all":
        where = "a float" if train.kind == "mask" else "a float or low-bit"
        raise ZolmError(f"a fake-quant base trains its own float masters; {train.kind} "
                        f"{'masks' if train.kind == 'mask' else 'adapters'} go over {where} base")
    if base.kind == "fake-quant" and base.act_bits is not None:
        raise ZolmError("act_bits fake-quantizes the inputs of low-bit layers; a fake-quant base quantizes weights "
                        "only (use base low-bit with LoRA / TT adapters for quantized activations)")
    if trains_codes(base, train) and not base.keep_sparsity:
        raise ZolmError("--no-keep-sparsity is not supported on low-bit codes: a pruned layer's codes keep their "
                        "stored sparsity mask")
    if est.perturb_bits and not trains_codes(base, train) and opt.weight_decay:
        raise ZolmError("weight decay is not supported with quantized perturbations on float tensors; use "
                        "weight_decay 0")
    if base.kind == "low-bit" and train.kind == "mask":
        raise ZolmError("masks over low-bit codes are not supported: train a mask on a float base, or LoRA / TT "
                        "adapters over the low-bit base")
    if trains_codes(base, train):
        if est.sampler != "ih4":
            raise ZolmError("ZO on low-bit codes quantizes the ih4 draw; use sampler ih4")
        if opt.weight_decay:
            raise ZolmError("weight decay is not defined on low-bit codes; use weight_decay 0")
    elif est.perturb_bits and est.sampler != "ih4":
        raise ZolmError("quantized perturbations round the ih4 draw; use sampler ih4")
    if train.kind in ("lora", "tt", "mask") and train.params:
        raise ZolmError(f"--train-params does not apply to trainable {train.kind}: it trains only its "
                        f"{'adapters' if train.kind != 'mask' else 'masked coordinates (use --mask-params)'}")


@dataclass(frozen=True)
class Preset:
    """A named method: the values it gives each part (everything else is the part's default)."""

    name: str
    summary: str
    base: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    estimator: dict = field(default_factory=dict)
    optim: dict = field(default_factory=dict)

    def parts(self) -> dict[str, dict]:
        return {"base": self.base, "train": self.train, "estimator": self.estimator, "optim": self.optim}
