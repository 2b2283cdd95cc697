"""Data-parallel ZO: 1 worker vs 2 workers (torchrun, gloo over loopback) on the same global batch.

Both runs fine-tune with MeZO for the same steps on the same global batch; the 2-worker run splits each batch
between two processes that share one scalar pair per forward pass. It reports how far the final weights of
the two runs are apart (they differ only by floating-point reduction order of the loss sums), how far training
moved them, the payload bytes each worker sent per step, and the time per step of each run.

Reproduce:  .venv/bin/python benchmarks/zo_distributed.py                       (SmolLM2-135M on SST-2)
            .venv/bin/python benchmarks/zo_distributed.py --steps 3 --batch-size 8
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment  # noqa: E402


def run(argv: list[str], threads: int) -> None:
    env = dict(os.environ, ZOLM_NO_PROGRESS="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    args = ap.parse_args()
    common = ["finetune", "--model", args.model, "--task", args.task, "--data-dir", str(DATA), "--method", "mezo",
              "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--eval-every", "0", "--num-dev", "0", "--num-test", "0", "--no-eval-before"]
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        run([sys.executable, "-m", "zolm", *common, "--out", str(one)], threads=torch.get_num_threads())
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zolm",
             *common, "--out", str(two)], threads=max(1, torch.get_num_threads() // 2))
        r1 = json.loads((one / "results.json").read_text())
        r2 = json.loads((two / "results.json").read_text())
        a = load_file(str(one / "model" / "model.safetensors"))
        b = load_file(str(two / "model" / "model.safetensors"))
        from zolm import models

        base, _ = models.load(args.model)
        moved = max((a[n] - p.detach()).abs().max().item() for n, p in base.named_parameters() if n in a)
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        identical = sum(int(torch.equal(a[k], b[k])) for k in a)
    print(json.dumps({
        "benchmark": "zo_distributed", "model": args.model, "task": args.task, "steps": args.steps,
        "global_batch": args.batch_size, "workers": r2["workers"],
        "max_abs_weight_diff": diff, "max_abs_weight_moved": moved, "diff_over_moved": diff / moved,
        "tensors_bit_identical": f"{identical}/{len(a)}",
        "bytes_sent_per_step_per_worker": r2["bytes_sent_per_step"],
        "step_s_1_worker": r1["train_time_s"] / args.steps, "step_s_2_workers": r2["train_time_s"] / args.steps,
        **environment()}))


if __name__ == "__main__":
    main()
