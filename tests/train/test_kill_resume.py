"""kill -9 (and Ctrl-C) a tiny-model ``zolm finetune`` at >= 20 random moments, rerun the same command each time:
the final weights, replay log and metrics are bit-identical to an uninterrupted run (slow: ~3 minutes)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

KILLS = 20


def command(model, data, out):
    return [sys.executable, "-m", "zolm", "finetune", "--model", model, "--data-dir", data, "--task", "sst2",
            "--method", "mezo", "--lr", "1e-3", "--steps", "16", "--batch-size", "4", "--num-train", "16",
            "--num-dev", "4", "--num-test", "4", "--eval-every", "4", "--checkpoint-every", "3",
            "--eval-batch-size", "4", "--out", str(out)]


def env():
    e = dict(os.environ, ZOLM_NO_PROGRESS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), e.get("PYTHONPATH", "")])
    return e


def finished(out: Path) -> bool:
    return (out / "results.json").is_file() and '"done"' in (out / "results.json").read_text()


@pytest.mark.slow
def test_random_kills_resume_bit_identically(tiny_llama_dir, data_dir, tmp_path):
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    subprocess.run(command(tiny_llama_dir, data_dir, ref), check=True, capture_output=True, env=env(), timeout=600)
    full = time.perf_counter() - t0
    rng = random.Random(15)
    kills, rounds, log = 0, 0, []
    while kills < KILLS:
        rounds += 1
        out = tmp_path / f"run{rounds}"
        while True:
            proc = subprocess.Popen(command(tiny_llama_dir, data_dir, out), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=env())
            delay = rng.uniform(0.3, full)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                sig = signal.SIGINT if kills % 5 == 4 else signal.SIGKILL  # every fifth: Ctrl-C
                proc.send_signal(sig)
                proc.wait(timeout=120)
                kills += 1
                log.append((rounds, round(delay, 2), sig.name))
            err = proc.stderr.read().decode()
            proc.stderr.close()
            startup = "KeyboardInterrupt" in err and "zolm/cli/__init__.py" not in err  # Ctrl-C before zolm runs
            assert "Traceback" not in err or startup, err[-3000:]
            if finished(out) or kills % 7 == 0:  # a few kills per run, then let it finish
                break
        done = subprocess.run(command(tiny_llama_dir, data_dir, out), capture_output=True, text=True, env=env(),
                              timeout=600)
        assert done.returncode == 0, (log, done.stderr[-3000:])
        a = load_file(str(ref / "model" / "model.safetensors"))
        b = load_file(str(out / "model" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), log
        assert (ref / "replay.jsonl").read_bytes() == (out / "replay.jsonl").read_bytes(), log
        assert (ref / "metrics.jsonl").read_bytes() == (out / "metrics.jsonl").read_bytes(), log
        assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old", ".lock"))], log
    assert kills >= KILLS
