"""GPU check in one short run (<= 5 minutes on one H200): the cuda test suite, then ZO step cost and memory.

Prints JSON lines:
  * ``{"part": "pytest", ...}``: ``pytest -m cuda -q`` run as a subprocess, its passed / failed / skipped counts;
  * one line per model and ZO half_mode (exact: float32 masters; lean: virtual perturbation + SR), in bf16:
    one zolm MeZO step over two forward passes (``step_over_2fwd``), a MeZO-style
    reference step over two forwards (``ref_step_over_2fwd``: torch.manual_seed + torch.normal per parameter,
    regenerated 4 times per step as princeton-nlp/MeZO does), their ratio (``zolm_over_ref``), and the peak
    GPU memory (torch.cuda.max_memory_allocated) of ZO steps over that of inference (``zo_peak_over_infer``).
    Models: SmolLM2-135M (built-in ``smollm2-135m``) and a randomly initialised ~1.1B Llama built from a
    LlamaConfig (hidden 2048, 16 layers, intermediate 5632, 32 heads, vocab 32000; nothing is downloaded).

The structure follows benchmarks/zo_step.py (CPU): interleaved forwards and steps, medians, the same batch
and reference step (imported from it); here everything runs in one process per model because CUDA peak
memory can be reset in-process.

Reproduce:  .venv/bin/python benchmarks/gpu.py                      (a CUDA machine)
            .venv/bin/python benchmarks/gpu.py --device cpu --tiny  (tiny configs on the CPU: a smoke test)
Without CUDA and without ``--device cpu`` it prints ``{"skipped": "no CUDA device"}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, environment, peak_mib, reset_peak  # noqa: E402
from zo_step import make_batch, reference_step  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
TINY_SMOLLM = dict(hidden_size=48, num_hidden_layers=2, intermediate_size=96, num_attention_heads=3,
                   num_key_value_heads=1, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True)


def zo_config(args: argparse.Namespace, half_mode: str = "exact"):
    """The ZO optimiser's config for every measured step (``--zo KEY=VALUE`` passes any other field through)."""
    from zolm.zo.optimizer import ZOConfig

    return ZOConfig(**{"eps": args.eps, "half_mode": half_mode, **args.zo})


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_zo_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--zo expects KEY=VALUE, got {item!r}")
        out[key] = _value(value)
    return out


def run_cuda_tests(timeout: int) -> dict:
    """``pytest -m cuda -q`` in a subprocess; the counts from its summary line."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail):
        kind = "errors" if kind.startswith("error") else kind
        counts[kind] = counts.get(kind, 0) + int(n)
    return {"part": "pytest", "rc": proc.returncode, **counts, "summary": tail,
            "seconds": round(time.perf_counter() - t0, 1)}


def build_model(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """``(label, model)``: the built-in SmolLM2-135M (tiny: a small stand-in) or the random ~1B Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2-135m" and not tiny:
        from zolm import models

        return name, models.load(name, dtype, device=device)[0]
    shape = {"smollm2-135m": TINY_SMOLLM, "llama-1b": TINY_LLAMA if tiny else LLAMA_1B}[name]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=dtype)
    return (f"{name}-tiny" if tiny else name), model.eval()


class Memory:
    """Peak memory since ``reset()``: CUDA allocations, or the process's resident peak on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        self.sync()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()

    def peak_mib(self) -> float:
        self.sync()
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else peak_mib()


def measure(args: argparse.Namespace, name: str, device: torch.device, half_mode: str = "exact") -> dict:
    """Step cost, reference step cost and peak memory of one model in one half_mode (module docstring)."""
    from zolm.eval.scoring import task_loss
    from zolm.zo.optimizer import ZOOptimizer
    from zolm.zo.spsa import ParamSet

    label, model = build_model(name, args.tiny, device, torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    batch_size, seq = (int(x) for x in args.shape.split("x"))
    b = make_batch(model, batch_size, seq)
    mem = Memory(device)

    def loss() -> float:
        with torch.inference_mode():
            return float(task_loss(model, b, "multiple_choice"))

    lr, eps = 1e-7, args.eps
    zo = ZOOptimizer(ParamSet(model, include=[".*"]), zo_config(args, half_mode))
    params = [p for _, p in model.named_parameters()]
    loss()  # warm-up: first-call allocations and kernel selection are not the steady state
    mem.reset()
    for _ in range(3):
        loss()
    infer_peak = mem.peak_mib()
    mem.reset()
    for step in range(1, 4):
        zo.step(loss, step, lr)
    zo_peak = mem.peak_mib()

    def ref_step(step: int) -> None:
        reference_step(params, loss, 1000 + step, eps, lr)

    def timed(fn, *a) -> float:
        mem.sync()
        t = time.perf_counter()
        fn(*a)
        mem.sync()
        return time.perf_counter() - t

    out = {}
    for mode, step_fn in (("zolm", lambda s: zo.step(loss, s, lr)), ("reference", ref_step)):
        step_fn(10)  # warm-up
        fwd = [timed(loss) for _ in range(2)]
        steps = []
        for r in range(args.reps):
            fwd.append(timed(loss))
            steps.append(timed(step_fn, 11 + r))
        out[mode] = (statistics.median(fwd), statistics.median(steps))
    (f, s), (rf, rs) = out["zolm"], out["reference"]
    return {"part": "zo_step", "model": label, "params": sum(p.numel() for p in params), "dtype": "bfloat16",
            "batch": batch_size, "seq": seq, "step_over_2fwd": round(s / (2 * f), 3),
            "ref_step_over_2fwd": round(rs / (2 * rf), 3), "zolm_over_ref": round(s / rs, 3),
            "zo_peak_over_infer": round(zo_peak / infer_peak, 3), "fwd_s": round(f, 4), "zolm_step_s": round(s, 4),
            "ref_step_s": round(rs, 4), "infer_peak_mib": round(infer_peak, 1), "zo_peak_mib": round(zo_peak, 1),
            "half_mode": half_mode, "master_mib": round(zo.store.master_bytes() / 2**20, 1),
            "zo_config": asdict(zo_config(args, half_mode))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a smoke test)")
    ap.add_argument("--tiny", action="store_true", help="tiny model configs instead of SmolLM2-135M and ~1B")
    ap.add_argument("--models", default="smollm2-135m,llama-1b")
    ap.add_argument("--shape", default=None, help="batch x sequence (default 16x64; tiny 2x16)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per mode (default 5; tiny 2)")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--zo", nargs="*", default=[], metavar="KEY=VALUE", help="extra ZOConfig fields")
    ap.add_argument("--half-modes", default="exact,lean", help="ZO half_mode(s) to measure, one line each")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest -m cuda run")
    ap.add_argument("--test-timeout", type=int, default=150)
    args = ap.parse_args(argv)
    args.zo = parse_zo_options(args.zo)
    args.shape = args.shape or ("2x16" if args.tiny else "16x64")
    args.reps = args.reps or (2 if args.tiny else 5)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}), flush=True)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    env = {**environment(), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if not args.no_tests:
        print(json.dumps({"benchmark": "gpu", **run_cuda_tests(args.test_timeout)}), flush=True)
    for name in args.models.split(","):
        for mode in args.half_modes.split(","):
            print(json.dumps({"benchmark": "gpu", **measure(args, name, device, mode), **env}), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
