"""QuZO vs naive quantized ZO vs full-precision MeZO vs first-order STE, at equal step budgets.

For each task it fine-tunes SmolLM2-135M with, in one run of this script:
  mezo-fp32            MeZO on the float32 model
  quant-mezo-int8/int4 MeZO's full-precision perturbation on the quantized model, updates rounded to nearest
  quzo-int8/int4       QuZO: 4-bit stochastically rounded perturbations (two independent draws), SR updates
  quzo-fm-int8/int4    QuZO's float-master regime: float masters, forward rounded onto a fixed grid, 4-bit
                       perturbations, float updates (what QuZO's full-model runs do)
  quzo-lora-int4       QuZO on LoRA adapters (r 8, q/v) over the frozen INT4 codes (QuZO's LoRA runs)
  fo-ste-int4          first order, fake-quantized forward with a straight-through estimator, AdamW
all with the same steps, batch, data and seed (INT4: groups of 32 columns; embeddings INT8); ``--jobs N`` trains N
runs at a time, each in its own process on cores / N threads (a run is deterministic: the same figures as one
after another, in less wall time; its train seconds then are not speeds). It reports the
test accuracy of each before (zero-shot, on its own quantized model) and after training (best on dev), then,
each in its own subprocess, the peak resident memory of three training steps of MeZO fp32, QuZO INT4, QuZO-FM
INT4 and QuZO-LoRA INT4 (each on the model saved in INT4, as `zolm quantize` writes it, so that no float32 copy
exists unless the method makes one) and FO-STE INT4 (float32 master weights), and the weight bytes of the fp32,
INT8 and INT4 models.

Reproduce:  .venv/bin/python benchmarks/quzo.py                  (sst2 + rte, 100 steps each, ~2 h)
            .venv/bin/python benchmarks/quzo.py --quick          (smoke run, a few minutes)
            issue 13's table (SST-2, 200 steps; about 35 min of one core per run, quzo-fm twice that):
            .venv/bin/python benchmarks/quzo.py --jobs 2 --tasks sst2 --steps 200 --lr 5e-5 --fm-lr 1e-5 \
            --lr-schedule linear --num-dev 100 --num-test 300 \
            --runs quzo-fm-int4,quzo-lora-int4,quant-mezo-int4,mezo-fp32
            and its INT8 / first-order rows: the same with --fm-lr 2.5e-5 --runs quzo-fm-int8,fo-ste-int4
            (quzo-fm's rate belongs to the grid: about MeZO's / (||d|| / ||eps u||) of benchmarks/quzo_fm_grid.py)
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment, peak_mib, reset_peak, run_worker  # noqa: E402

RUNS = {  # name: (method, extra config)
    "mezo-fp32": ("mezo", {}),
    "quant-mezo-int8": ("quant-mezo", {"bits": 8}),
    "quant-mezo-int4": ("quant-mezo", {"bits": 4}),
    "quzo-int8": ("quzo", {"bits": 8}),
    "quzo-int4": ("quzo", {"bits": 4}),
    "quzo-fm-int8": ("quzo-fm", {"bits": 8}),
    "quzo-fm-int4": ("quzo-fm", {"bits": 4}),
    "quzo-lora-int4": ("quzo-lora", {"bits": 4}),
    "fo-ste-int4": ("fo-ste", {"bits": 4}),
}
DEFAULT_RUNS = "mezo-fp32,quant-mezo-int8,quant-mezo-int4,quzo-int8,quzo-int4,fo-ste-int4"


def train(task: str, name: str, steps: int, args, out: Path) -> dict:
    from zolm.train.config import FinetuneConfig
    from zolm.train.loop import finetune

    method, extra = RUNS[name]
    lr = {"fo-ste": args.fo_lr, "quzo-lora": args.lora_lr, "quzo-fm": args.fm_lr or args.lr}.get(method, args.lr)
    if args.lr_schedule:
        extra = {**extra, "lr_schedule": args.lr_schedule}
    cfg = FinetuneConfig.of(out=str(out), model=args.model, task=task, data_dir=str(DATA), method=method, lr=lr,
                         steps=steps, batch_size=args.batch_size, num_dev=args.num_dev, num_test=args.num_test,
                         eval_every=max(1, steps // 2), eval_batch_size=32, **extra)
    t = time.perf_counter()
    r = finetune(cfg)
    metric = "accuracy"
    return {"before": r["before"][metric], "after": r["after"][metric], "best_dev": r["best_dev"][metric],
            "lr": lr, "lr_schedule": cfg.optim.lr_schedule, "train_s": r["train_time_s"],
            "wall_s": round(time.perf_counter() - t, 1)}


TRAIN_ARGS = ("model", "batch_size", "lr", "fo_lr", "lora_lr", "fm_lr", "lr_schedule", "num_dev", "num_test")


def train_worker(spec: str) -> dict:
    """One training run in this process, from the JSON the parent wrote (``--jobs``)."""
    job = json.loads(spec)
    torch.set_num_threads(job["threads"])
    return train(job["task"], job["name"], job["steps"], argparse.Namespace(**job["args"]), Path(job["out"]))


def train_all(args, root: Path) -> dict:
    """{task: {run: result}} for every task x run; ``args.jobs`` at a time, each in a subprocess when > 1."""
    pairs = [(task, name) for task in args.tasks.split(",") for name in args.runs.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def one(pair: tuple[str, str]) -> dict:
        task, name = pair
        if args.jobs == 1:
            r = train(task, name, args.steps, args, root / task / name)
        else:
            job = {"task": task, "name": name, "steps": args.steps, "out": str(root / task / name),
                   "threads": threads, "args": {k: getattr(args, k) for k in TRAIN_ARGS}}
            r = run_worker(__file__, "train", json.dumps(job), timeout=24 * 3600)
        print(f"# {task} {name}: {r}", file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, pairs))
    table: dict = {}
    for (task, name), r in zip(pairs, results):
        table.setdefault(task, {})[name] = r
    return table


def memory_worker(name: str, model_name: str, batch: int) -> dict:
    """Peak RSS of three training steps (after the model is loaded and quantized)."""
    from zolm import models
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.train.build import build_method
    from zolm.train.config import FinetuneConfig
    from zolm.train.methods import StepBatch

    method, extra = RUNS[name]
    cfg = FinetuneConfig.of(out="unused", model=model_name, method=method, **extra)
    model, tok = models.load(model_name)
    splits = load_splits("sst2", DATA, num_train=batch, num_dev=0, num_test=0)
    b = training_batch(encode_all(tok, splits.train), "classification", tok.pad_token_id)
    m = build_method(model, cfg)
    sb = StepBatch(parts=[(0, b)], kinds=["classification"], weights=[1.0])
    m.step(sb, 1, 1e-6)  # warm-up
    weight_bytes = sum(t.numel() * t.element_size() for t in list(m.model.parameters()) + list(m.model.buffers()))
    reset_peak()
    for step in range(2, 5):
        m.step(sb, step, 1e-6)
    return {"peak_mib": peak_mib(), "model_tensor_mib": weight_bytes / 2**20}


def weight_bytes(model_name: str) -> dict:
    from zolm import models
    from zolm.quant import QuantConfig, QuantFormat, quantize_

    out = {}
    for name, qc in [("fp32", None), ("int8", QuantConfig(weight=QuantFormat("int", 8))),
                     ("int4-g32", QuantConfig(weight=QuantFormat("int", 4, group_size=32)))]:
        model, tok = models.load(model_name)
        if qc is not None:
            quantize_(model, qc)
        nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        with tempfile.TemporaryDirectory() as d:
            models.save(model, tok, Path(d) / "m")
            disk = sum(f.stat().st_size for f in (Path(d) / "m").glob("*.safetensors"))
        out[name] = {"tensor_mib": round(nbytes / 2**20, 1), "disk_mib": round(disk / 2**20, 1)}
    for k in ("int8", "int4-g32"):
        out[k]["ratio_to_fp32"] = round(out[k]["tensor_mib"] / out["fp32"]["tensor_mib"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs="+", help="internal: memory RUN MODEL BATCH | train JSON")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5, help="ZO learning rate (all ZO runs)")
    ap.add_argument("--fo-lr", type=float, default=1e-5, help="FO-STE learning rate (AdamW)")
    ap.add_argument("--lora-lr", type=float, default=3e-3,
                    help="quzo-lora's learning rate (adapters; 1e-3 did not move SST-2 in 200 steps, 1e-2 diverged)")
    ap.add_argument("--fm-lr", type=float, default=None,
                    help="quzo-fm's learning rate (default --lr; the fixed grid amplifies the perturbation, "
                         "docs/results.md issue 13)")
    ap.add_argument("--lr-schedule", choices=("constant", "linear"), default=None,
                    help="every run's schedule (default: each method's own)")
    ap.add_argument("--num-dev", type=int, default=200)
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of {','.join(RUNS)}")
    ap.add_argument("--out", default=None, help="keep the run directories here")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time, each in its own process")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    from zolm.train.config import FinetuneConfig

    if args.worker:
        kind, *rest = args.worker
        print(json.dumps(train_worker(*rest) if kind == "train" else memory_worker(rest[0], rest[1], int(rest[2]))))
        return
    if args.quick:
        args.steps, args.num_dev, args.num_test, args.tasks = 4, 16, 32, "sst2"
    root = Path(args.out or tempfile.mkdtemp(prefix="zolm-quzo-"))
    table = train_all(args, root)
    with tempfile.TemporaryDirectory() as qdir:  # QuZO trains a model saved low-bit: no fp32 copy ever exists
        from zolm import models
        from zolm.quant import quantize_

        model, tok = models.load(args.model)
        quantize_(model, FinetuneConfig.of(out="unused", method="quzo", bits=4).quant_config())
        models.save(model, tok, Path(qdir) / "int4")
        del model
        memory = {name: run_worker(__file__, "memory", name, src, str(args.batch_size))
                  for name, src in (("mezo-fp32", args.model), ("quzo-int4", str(Path(qdir) / "int4")),
                                    ("quzo-fm-int4", str(Path(qdir) / "int4")),
                                    ("quzo-lora-int4", str(Path(qdir) / "int4")), ("fo-ste-int4", args.model))}
    print(json.dumps({
        "benchmark": "quzo", "model": args.model, "steps": args.steps, "batch": args.batch_size,
        "num_dev": args.num_dev, "num_test": args.num_test, "jobs": args.jobs, "accuracy": table,
        "train_peak_mib": {k: round(v["peak_mib"]) for k, v in memory.items()},
        "fo_ste_over_quzo_int4_peak": round(memory["fo-ste-int4"]["peak_mib"] / memory["quzo-int4"]["peak_mib"], 3),
        "weights": weight_bytes(args.model), "torch_threads": torch.get_num_threads(), **environment()}))


if __name__ == "__main__":
    main()
