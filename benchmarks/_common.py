"""Helpers shared by the benchmark scripts (not part of the zolm package)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ZOLM_DATA", ROOT.parent / "shared" / "data"))


def reset_peak() -> None:
    """Forget the process's peak RSS so far (Linux: writing 5 to clear_refs resets VmHWM)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    """Peak resident memory (VmHWM) since the last reset_peak(), in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def run_worker(script: str, *args: str, timeout: int = 3600) -> dict:
    """Run ``python script --worker args...`` in a fresh process and parse its last JSON line."""
    env = dict(os.environ, ZOLM_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}
