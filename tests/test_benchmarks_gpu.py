"""benchmarks/gpu.py end to end on the CPU with tiny configs, its no-CUDA line, and its pytest-summary parsing."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _run(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()]


def test_tiny_run_on_cpu_prints_one_line_per_model_and_half_mode():
    lines = _run("--device", "cpu", "--tiny", "--no-tests", "--reps", "1", "--zo", "sampler=\"rademacher\"")
    assert [(r["model"], r["half_mode"]) for r in lines] == [
        ("smollm2-135m-tiny", "exact"), ("smollm2-135m-tiny", "lean"), ("llama-1b-tiny", "exact"),
        ("llama-1b-tiny", "lean")]
    assert [r["master_mib"] > 0 for r in lines] == [True, False, True, False]
    for r in lines:
        assert r["dtype"] == "bfloat16" and r["device"] == "cpu" and r["zo_config"]["sampler"] == "rademacher"
        for key in ("step_over_2fwd", "ref_step_over_2fwd", "zolm_over_ref", "zo_peak_over_infer"):
            assert r[key] > 0, key


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_skips():
    assert _run() == [{"skipped": "no CUDA device"}]


def test_pytest_summary_is_counted(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    done = subprocess.CompletedProcess([], 1, stdout="..F.s\n3 passed, 1 failed, 1 skipped, 2 errors in 4.2s\n")
    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: done)
    r = mod.run_cuda_tests(10)
    assert (r["passed"], r["failed"], r["skipped"], r["errors"], r["rc"]) == (3, 1, 1, 2, 1)
