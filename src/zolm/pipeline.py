"""Recipes: dense model -> prune -> quantize -> fine-tune -> eval, as restartable stages (``zolm run``).

A recipe is a YAML (or JSON) file::

    model: smollm2-135m
    data_dir: ../shared/data
    out: runs/pipeline
    report: {tasks: [sst2], num_test: 200, perplexity: wikitext2, seq_len: 512, max_windows: 16}
    stages:
      - prune: {method: wanda++, nm: "2:4", nsamples: 32, seqlen: 256}
      - quantize: {bits: 4, group_size: 32}
      - finetune: {method: quzo, task: sst2, steps: 100, lr: 1.0e-5}
      - eval: {}

Stage i writes ``out/<i>-<type>/`` and, when it is complete, ``stage.json`` (what it read, how it was
configured, where its model is, the report measured after it). Running the recipe again skips complete stages
whose inputs and options are unchanged and restarts at the first one that is not; a fine-tuning stage that was
interrupted resumes from its own checkpoint. After each stage (and for the input model) the report gives
accuracy, perplexity, sparsity and model size.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zolm import models
from zolm.errors import ZolmError, unknown
from zolm.utils.io import atomic_write_json
from zolm.utils.outputs import check_output
from zolm.utils.sparse import unpack_mask

STAGES = ("prune", "quantize", "finetune", "eval")
CALIB_DEFAULTS = {"calib": "c4", "nsamples": 32, "seqlen": 256, "seed": 0}  # the prune / quantize stages' own keys


@dataclass
class ReportOptions:
    """What every stage's report measures (recipe key ``report``; checked when the recipe is read)."""

    tasks: list[str] = field(default_factory=list)  # accuracy on each task's test split
    num_test: int = 500
    batch_size: int | None = None
    perplexity: str | None = None  # "wikitext2" or a text file
    seq_len: int = 512
    max_windows: int | None = None
QUANT_KEYS = ("bits", "format", "fp8_variant", "group_size", "embed_bits", "act_bits", "fp16_scales")


@dataclass
class Recipe:
    """A validated recipe (see the module docstring for the file format)."""

    model: str
    out: str
    stages: list[tuple[str, dict]]
    data_dir: str | None = None
    report: dict = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Recipe:
        from zolm.train.config import FinetuneConfig

        path = Path(path)
        if not path.is_file():
            raise ZolmError(f"no such recipe file: {path}")
        try:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except Exception as e:  # noqa: BLE001 - one line whatever the parser says
            raise ZolmError(f"{path}: cannot parse recipe ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ZolmError(f"{path}: a recipe must be a mapping (model, out, stages, ...), got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        valid = {"model", "out", "stages", "data_dir", "report"}
        bad = sorted(set(data) - valid)
        if bad:
            raise ZolmError(f"{path}: unknown recipe key(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
        if not data.get("out") or not isinstance(data.get("stages"), list) or not data["stages"]:
            raise ZolmError(f"{path}: a recipe needs 'out' and a non-empty list of 'stages'")
        for key, kind in (("model", str), ("out", str), ("data_dir", str), ("report", dict)):
            if data.get(key) is not None and not isinstance(data[key], kind):
                what = "a string" if kind is str else "a mapping"
                raise ZolmError(f"{path}: {key} must be {what}, got {data[key]!r}")
        stages = []
        for i, entry in enumerate(data["stages"], start=1):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ZolmError(f"{path}: stage {i} must be a mapping with one key (the stage type)")
            (kind, opts), = entry.items()
            if kind not in STAGES:
                raise unknown(f"stage type (stage {i})", kind, STAGES)
            if opts is not None and not isinstance(opts, dict):
                raise ZolmError(f"{path}: stage {i} ({kind}) options must be a mapping of keys to values, "
                                f"got {opts!r}")
            stages.append((kind, dict(opts or {})))
        from zolm.utils.configs import build

        build(ReportOptions, data.get("report") or {}, f"{path}: report")
        recipe = cls(model=data.get("model", "smollm2-135m"), out=str(data["out"]), stages=stages,
                     data_dir=data.get("data_dir"), report=dict(data.get("report") or {}))
        for i, (kind, opts) in enumerate(recipe.stages, start=1):  # every stage's options fail here, before any work
            where = f"{path}: stage {i} ({kind})"
            if kind == "prune":
                _prune_config(opts, where)
            elif kind == "quantize":
                quant_options(opts, where).quant_config()
            elif kind == "finetune":
                FinetuneConfig.from_dict({"out": "x", **opts}, where=where)
        return recipe


def _without_calibration_keys(opts: dict, where: str) -> dict:
    """A stage's options less its calibration-data keys (CALIB_DEFAULTS), whose types are checked here."""
    from zolm.utils.configs import check_value

    for key, default in CALIB_DEFAULTS.items():
        if key in opts:
            check_value(opts[key], type(default), f"{where}: {key}")
    return {k: v for k, v in opts.items() if k not in CALIB_DEFAULTS}


def _calibration(opts: dict) -> dict:
    """A stage's calibration-data keys, defaults filled in."""
    return {k: opts.get(k, default) for k, default in CALIB_DEFAULTS.items()}


def quant_options(opts: dict, where: str):
    """The quantize stage's options as a low-bit BaseWeights (types and keys checked; the calibration-data keys,
    used by clip act, are the stage's own)."""
    from zolm.train.parts import BaseWeights
    from zolm.utils.configs import build

    base = build(BaseWeights, {"kind": "low-bit", **_without_calibration_keys(opts, where)}, where)
    if base.clip != "act" and any(k in opts for k in CALIB_DEFAULTS):
        raise ZolmError(f"{where}: calibration keys ({', '.join(k for k in CALIB_DEFAULTS if k in opts)}) only "
                        "apply with clip: act")
    return base


def _prune_config(opts: dict, where: str = "prune stage"):
    """The prune stage's PruneConfig (keys and types checked; calibration-data keys are the stage's own)."""
    from zolm.prune.api import PruneConfig
    from zolm.utils.configs import build

    return build(PruneConfig, _without_calibration_keys(opts, where), where)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".gguf"))


@torch.no_grad()
def sparsity(model) -> dict[str, float]:
    """Zeros among the linear weights (LM head aside), and the share a pruning mask keeps at zero."""
    from zolm.blocks import is_linear, out_in
    from zolm.quant.linear import QuantLinear

    head = model.get_output_embeddings()
    zeros = total = pruned = 0
    for name, layer in model.named_modules():
        if layer is head or ".lora_" in name or not (isinstance(layer, QuantLinear) or is_linear(layer)):
            continue
        if isinstance(layer, QuantLinear):
            w = layer.dequantize()
            if layer.sparsity_mask is not None:
                pruned += int((~unpack_mask(layer.sparsity_mask, w.numel())).sum())
        else:
            w = out_in(layer)
            pruned += int((w == 0).sum())
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"zeros": zeros / max(total, 1), "pruned": pruned / max(total, 1)}


def measure(model_dir: str, report: dict, data_dir: str | None) -> dict:
    """Accuracy on ``report['tasks']``, perplexity, sparsity and size of the model saved in ``model_dir``."""
    from zolm.adapters import load_model_or_adapters
    from zolm.data.encode import encode_all
    from zolm.data.tasks import load_splits
    from zolm.eval.evaluate import evaluate_items

    model, tok = load_model_or_adapters(model_dir)  # a LoRA stage's output: its low-bit base + the adapter
    out: dict[str, Any] = {"sparsity": sparsity(model)}
    p = Path(model_dir)
    out["disk_mib"] = round(_dir_bytes(p) / 2**20, 1) if p.is_dir() else None
    out["tensor_mib"] = round(sum(t.numel() * t.element_size() for t in
                                  list(model.parameters()) + list(model.buffers())) / 2**20, 1)
    for task in report.get("tasks", []):
        s = load_splits(task, data_dir, num_train=0, num_dev=0, num_test=report.get("num_test", 500))
        res = evaluate_items(model, tok, encode_all(tok, s.test), s.task.kind, report.get("batch_size", 32))
        out[task] = res.get("accuracy", res.get("f1"))
    if report.get("perplexity"):
        from zolm.eval.perplexity import perplexity, read_wikitext

        text = report["perplexity"]
        path = Path(data_dir) / "wikitext2" / "wiki.test.raw" if text == "wikitext2" and data_dir else Path(text)
        ids = torch.tensor(tok(read_wikitext(path))["input_ids"], dtype=torch.long)
        out["perplexity"] = round(perplexity(model, ids, report.get("seq_len", 512), report.get("max_windows"),
                                             report.get("batch_size", 8))["perplexity"], 3)
    return out


def _load_plain(src: str):
    """The previous stage's model as a plain (or zolm low-bit) model: a LoRA stage's adapter is merged."""
    from zolm.adapters import load_model_or_adapters

    return load_model_or_adapters(src, merge=True)


def _run_stage(kind: str, opts: dict, src: str, sdir: Path, recipe: Recipe, quant: dict) -> tuple[str, dict]:
    """Run one stage on the model in ``src``; returns (its output model directory, details)."""
    details: dict[str, Any] = {}
    if kind == "prune":
        from zolm.data.calibration import calibration_ids, check_fits_positions
        from zolm.prune.api import prune_

        cfg = _prune_config(opts)
        model, tok = _load_plain(src)
        c = _calibration(opts)
        calib = None
        if cfg.needs_calibration:
            check_fits_positions(model.config, c["seqlen"], "prune stage: seqlen")
            calib = calibration_ids(tok, c["calib"], recipe.data_dir, c["nsamples"], c["seqlen"], c["seed"])
        report = prune_(model, cfg, calib)
        details = {"seconds": round(report.seconds, 1), "sparsity": report.sparsity}
        models.save(model, tok, sdir / "model")
        atomic_write_json(sdir / "prune_report.json", report.to_dict())
        return str(sdir / "model"), details
    if kind == "quantize":
        from zolm.quant.linear import quantize_
        qc = quant_options(opts, "quantize stage").quant_config()
        model, tok = _load_plain(src)
        importance = None
        if qc.weight.clip == "act":
            from zolm.quant.calibrate import calibrated_importance

            c = _calibration(opts)
            importance = calibrated_importance(model, tok, c["calib"], recipe.data_dir, c["nsamples"], c["seqlen"],
                                               c["seed"])
        quantize_(model, qc, importance=importance)
        models.save(model, tok, sdir / "model")
        return str(sdir / "model"), {"format": qc.weight.name}
    if kind == "finetune":
        from zolm.train.config import FinetuneConfig
        from zolm.train.loop import finetune

        cfg = FinetuneConfig.from_dict({**quant, "data_dir": recipe.data_dir, **opts, "model": src,
                                        "out": str(sdir / "run")})
        results = finetune(cfg)  # resumes from sdir/run/checkpoint if an earlier attempt was interrupted
        return str(sdir / "run" / "model"), {"before": results["before"], "after": results["after"],
                                              "train_time_s": results["train_time_s"]}
    return src, {}  # eval: report on the current model


def run_recipe(recipe: Recipe, overwrite: bool = False, echo=print) -> list[dict]:
    """Run every stage not already complete; returns one summary per stage (stage 0: the input model)."""
    import shutil

    out = Path(recipe.out)
    ours = out.is_dir() and all(re.fullmatch(r"\d+-\w+|pipeline\.json|\..*", p.name) for p in out.iterdir())
    check_output(out, overwrite=overwrite or ours, inputs=[recipe.model, recipe.data_dir])  # a user's folder: refused
    if overwrite and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    current, key, quant = recipe.model, _key(recipe.model), {}
    summaries = []
    for i, (kind, opts) in enumerate([("input", {})] + recipe.stages):
        sdir = out / f"{i}-{kind}"
        key = _key(key, kind, opts, recipe.data_dir, recipe.report)
        marker = sdir / "stage.json"
        done = json.loads(marker.read_text()) if marker.is_file() else None
        if kind == "quantize":
            quant = {k: v for k, v in opts.items() if k in QUANT_KEYS}
        if done is not None and done.get("key") == key:
            current, summary = done["output"], done["summary"]
            echo(f"[{i}] {kind}: complete, skipped")
        else:
            t0 = time.perf_counter()
            sdir.mkdir(parents=True, exist_ok=True)
            current, details = (current, {}) if kind == "input" else _run_stage(kind, opts, current, sdir, recipe,
                                                                                 quant)
            summary = {"stage": kind, **details, **measure(current, recipe.report, recipe.data_dir),
                       "seconds": round(time.perf_counter() - t0, 1)}
            atomic_write_json(marker, {"key": key, "output": current, "options": opts, "summary": summary})
        summaries.append(summary)
        echo(f"[{i}] {kind}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in summary.items()
                                          if k not in ("stage", "before", "after")))
    atomic_write_json(out / "pipeline.json", {"model": recipe.model, "stages": summaries})
    return summaries


def summary_table(summaries: list[dict]) -> list[str]:
    """The before/after table of a recipe run (one row per stage: task accuracies, perplexity, pruned share, size,
    seconds) and, for every fine-tuning stage, its change against the stage before it (the compressed start)."""
    skip = {"stage", "before", "after", "seconds", "sparsity", "disk_mib", "tensor_mib", "perplexity", "format",
            "train_time_s"}
    metrics = [k for k in summaries[0] if k not in skip and isinstance(summaries[0][k], int | float)] if summaries \
        else []
    head = ["stage", *metrics, "perplexity", "pruned", "MiB", "s"]
    rows = [head, ["---"] * len(head)]
    for i, s in enumerate(summaries):
        ppl, mib = s.get("perplexity"), s.get("disk_mib") or s.get("tensor_mib")
        rows.append([f"{i} {s['stage']}", *(_fmt(s.get(k)) for k in metrics), _fmt(ppl) if ppl else "-",
                     f"{s.get('sparsity', {}).get('pruned', 0):.2f}", f"{mib:.1f}" if mib else "-",
                     f"{s.get('seconds', 0):.0f}"])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    for i, s in enumerate(summaries[1:], 1):
        if s["stage"] != "finetune":
            continue
        start = summaries[i - 1]
        parts = [f"{k} {start[k]:.3f} -> {s[k]:.3f} ({s[k] - start[k]:+.3f})" for k in metrics
                 if isinstance(start.get(k), int | float) and isinstance(s.get(k), int | float)]
        if start.get("perplexity") and s.get("perplexity"):
            parts.append(f"perplexity {start['perplexity']:.2f} -> {s['perplexity']:.2f} "
                         f"({100 * (s['perplexity'] / start['perplexity'] - 1):+.1f}%)")
        lines.append(f"stage {i} (finetune) against its start: " + ", ".join(parts))
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)
