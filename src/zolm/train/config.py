"""FinetuneConfig: a run (model, data, steps, evaluation) and the four parts of its method, validated up front.

A method is a composition of parts (zolm.train.parts): ``base`` weights x ``train``able set x ``estimator`` x
``optim``iser. ``method`` names a preset (zolm.train.presets) that fills the parts a config leaves out; any part
value given explicitly wins over the preset. Config files nest by part::

    method: quzo-lora
    base: {bits: 4, group_size: 32}
    train: {lora: {r: 8}}
    estimator: {perturb_bits: 4}

and every part field is also accepted under its flat command-line name (``bits: 4``, ``lora_r: 8``), so older
configs, recipes and replay logs keep working. ``to_dict()`` records the resolved parts (run_config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from zolm.errors import ZolmError, unknown
from zolm.train.parts import (
    BaseWeights,
    Estimator,
    Optimizer,
    TrainableSet,
    check_composition,
    trains_codes,
)
from zolm.train.presets import PRESETS
from zolm.utils.configs import build, check_value, deep_merge, flag_name, leaves, option, set_path, to_dict

PARTS = ("base", "train", "estimator", "optim")
PART_CLASSES = dict(zip(PARTS, (BaseWeights, TrainableSet, Estimator, Optimizer)))
METHODS = tuple(PRESETS)
RUN, DATA, EVAL = "run", "data", "evaluation"


@dataclass
class FinetuneConfig:
    """Configuration of ``zolm finetune`` (also accepted as a YAML or JSON file)."""

    out: str = option("", "run directory (results, checkpoints, logs); an existing run with the same config resumes",
                      group=RUN)
    model: str = option("smollm2-135m", "built-in name (smollm2-135m), local directory or Hugging Face id", group=RUN)
    method: str = option("mezo", "a preset naming the parts: " + ", ".join(METHODS) + "; part flags override it",
                         group=RUN)
    dtype: str = option("float32", "model dtype: float32, bfloat16 or float16", group=RUN)
    device: str = option("cpu", "cpu, cuda, cuda:1, ... (ignored when device_map is set)", group=RUN)
    device_map: str | None = option(None, "e.g. auto: shard a large model over devices (accelerate)", group=RUN)
    steps: int = option(1000, "training steps", group=RUN)
    batch_size: int = option(16, "the global batch: split over torchrun workers and grad_accum micro-batches",
                             group=RUN)
    grad_accum: int = option(1, "micro-batches per worker and step", group=RUN)
    seed: int = option(0, "run seed (ZO perturbations, adapter initialisation, data order)", group=RUN)
    task: str = option("sst2", "task name (sst2, rte, cb, boolq, wsc, wic, multirc, copa, squad), or a "
                       "comma-separated mixture", group=DATA)
    task_weights: list[float] = option([], "mixture proportions, one per task (default: uniform)", group=DATA)
    data_dir: str | None = option(None, "folder of <task>/<split>.jsonl files (default: the Hugging Face hub)",
                                  group=DATA)
    num_train: int = option(1000, "training examples (MeZO protocol)", group=DATA)
    num_dev: int | None = option(None, "dev examples (default: 500; CB and COPA 100)", group=DATA)
    num_test: int = option(1000, "test examples", group=DATA)
    max_length: int = option(1024, "maximum tokens per example", group=DATA)
    data_seed: int = option(0, "seed of the train/dev/test sampling", group=DATA)
    eval_every: int = option(200, "evaluate on dev every N steps (0: only at the end); best-on-dev weights are kept",
                             group=EVAL)
    checkpoint_every: int | None = option(None, "write a resumable checkpoint every N steps (default: eval_every)",
                                          group=EVAL)
    eval_batch_size: int = option(16, "evaluation batch size", group=EVAL)
    eval_before: bool = option(True, "evaluate on test before training (zero-shot)", group=EVAL)
    base: BaseWeights | None = field(default=None)
    train: TrainableSet | None = field(default=None)
    estimator: Estimator | None = field(default=None)
    optim: Optimizer | None = field(default=None)

    def __post_init__(self) -> None:
        if self.method not in PRESETS:
            raise unknown("method", self.method, METHODS)
        preset = PRESETS[self.method].parts()
        for name, cls in PART_CLASSES.items():  # a part not given comes from the preset; a dict merges into it
            given = getattr(self, name)
            if given is None or isinstance(given, dict):
                setattr(self, name, build(cls, deep_merge(preset[name], given or {}), name))
            elif not isinstance(given, cls):
                raise ZolmError(f"{name} must be a {cls.__name__} or a mapping of its options, got {given!r}")
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "max_length", "num_train", "num_test"):
            if getattr(self, name) < 1:
                raise ZolmError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ZolmError(f"eval_every must be >= 0, got {self.eval_every}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ZolmError(f"task must name one or more distinct tasks, got {self.task!r}")
        if self.task_weights and len(self.task_weights) != len(self.tasks):
            raise ZolmError(f"task_weights has {len(self.task_weights)} values for {len(self.tasks)} tasks")
        if self.checkpoint_every is None:
            self.checkpoint_every = self.eval_every
        if self.checkpoint_every < 0:
            raise ZolmError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        check_composition(self.base, self.train, self.estimator, self.optim)

    # ------------------------------------------------------------------ views used by the training code
    @property
    def tasks(self) -> list[str]:
        return [t.strip() for t in self.task.split(",") if t.strip()]

    @property
    def is_zo(self) -> bool:
        return self.estimator.kind == "spsa"

    @property
    def trains_codes(self) -> bool:
        """The trained tensors are the base's low-bit codes (QuZO's true low-bit mode)."""
        return trains_codes(self.base, self.train)

    def quant_config(self):
        return self.base.quant_config()

    def describe(self) -> str:
        """One line naming the parts, e.g. ``low-bit int4 base x lora x spsa (4-bit perturbations) x sgd``."""
        b, t, e = self.base, self.train, self.estimator
        base = b.kind if b.kind == "float" else f"{b.kind} " + (f"fp8-{b.fp8_variant}" if b.format == "fp8"
                                                                   else f"int{b.bits}")
        est = e.kind + (f" ({e.perturb_bits}-bit perturbations)" if e.perturb_bits else "") + (
            ", adaptive queries" if e.schedule == "adaptive" else "")
        train = t.kind if t.kind != "mask" else f"{t.mask.kind} mask"
        return f"{base} base x {train} x {est} x {self.optim.kind}"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PARTS}
        out.update({p: to_dict(getattr(self, p)) for p in PARTS})
        return json.loads(json.dumps(out))  # plain lists and dicts

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> FinetuneConfig:
        """Build from a (possibly flat) mapping: run keys, nested parts, or parts' flat names; types checked."""
        run, nested = split_config(data, where)
        return cls.build(run, nested, where)

    @classmethod
    def build(cls, run: dict[str, Any], nested: dict[str, Any], where: str = "config") -> FinetuneConfig:
        """From run-level values and nested part values (over the preset ``run["method"]`` names)."""
        run = build_run(cls, run, where)
        method = run.get("method", "mezo")
        if method not in PRESETS:
            raise unknown("method", method, METHODS)
        parts = deep_merge(PRESETS[method].parts(), nested)
        built = {p: build(c, parts.get(p, {}), f"{where}: {p}") for p, c in PART_CLASSES.items()}
        return cls(**run, **built)

    @classmethod
    def of(cls, **kwargs: Any) -> FinetuneConfig:
        """``from_dict(kwargs)``: the Python shorthand, e.g. ``FinetuneConfig.of(method="quzo", bits=8)``."""
        return cls.from_dict(kwargs)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> FinetuneConfig:
        """Read a YAML (.yaml/.yml) or JSON file; ``overrides`` (not None, flat or nested) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise ZolmError(f"no such config file: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - yaml, json and decoding raise different types
            raise ZolmError(f"{path}: cannot parse config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ZolmError(f"{path}: a config file must hold a mapping of keys to values")
        run, nested = split_config(data, str(path))
        run_over, nested_over = split_config({k: v for k, v in overrides.items() if v is not None}, "options")
        return cls.build({**run, **run_over}, deep_merge(nested, nested_over), str(path))


LEGACY_KEYS = {"lora_r", "tt_rank", "mazo_alpha", "q_schedule", "perturb_bits"}  # a whole pre-parts flat record


def split_config(data: Any, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-level values, nested part values) of a config mapping whose parts may be nested or flat.

    A flat name wins over the same key nested in the same mapping. A complete flat record written before the parts
    existed (run_config.json, replay headers, recipes) reads as the run it was: None meant "the method's default",
    and q_schedule only ever applied to adazeta.
    """
    if not isinstance(data, dict):
        raise ZolmError(f"{where}: expected a mapping of keys to values, got {data!r}")
    run_fields = {f.name for f in fields(FinetuneConfig) if f.name not in PARTS}
    if LEGACY_KEYS <= set(data) and not set(PARTS) & set(data):
        data = {k: v for k, v in data.items() if v is not None}
        if data.get("method") != "adazeta":
            data = {k: v for k, v in data.items() if not k.startswith("q_")}
    run: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    flat = flat_names()
    given_flat = []
    for key, value in data.items():
        if key in run_fields:
            run[key] = value
        elif key in PARTS and not (key in flat and isinstance(value, str)):  # --base low-bit is the kind
            if value is not None and not isinstance(value, dict):
                raise ZolmError(f"{where}: {key} must be a mapping of part options, got {value!r}")
            nested[key] = deep_merge(nested.get(key, {}), value or {})
        elif key in flat:
            given_flat.append((flat[key], value))
        else:
            valid = sorted(run_fields | set(PARTS) | set(flat))
            raise ZolmError(f"{where}: unknown key {key!r}; valid: {', '.join(valid)}")
    for path, value in given_flat:
        set_path(nested, path, value)
    return run, nested


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``to_dict()`` records (e.g. ``optim.lr``)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


def build_run(cls, run: dict[str, Any], where: str) -> dict[str, Any]:
    """Type-check the run-level keys (the parts are built by zolm.utils.configs.build)."""
    import typing

    hints = typing.get_type_hints(cls)
    return {k: check_value(v, hints[k], f"{where}: {k}") for k, v in run.items()}


def flat_names() -> dict[str, tuple[str, ...]]:
    """{flat name: path} of every part field, e.g. ``lora_r -> (train, lora, r)``, ``bits -> (base, bits)``."""
    out = {}
    for part, cls in PART_CLASSES.items():
        for path, f, _ in leaves(cls, (part,)):
            out[flag_name(path, f)] = path
    return out


def composition_table() -> list[dict[str, str]]:
    """One row per preset: the parts it names (README / docs/methods.md)."""
    rows = []
    for name in PRESETS:
        c = FinetuneConfig(method=name)
        rows.append({"method": name, "parts": c.describe(), "summary": PRESETS[name].summary})
    return rows
