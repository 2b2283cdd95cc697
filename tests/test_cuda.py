"""GPU checks (``pytest -m cuda``; skipped without CUDA): loading, pruning, quantized models, MeZO, torchrun nccl.

Tiny random models only, so the whole file takes seconds on one GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zolm import models
from zolm.cli import main
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune

pytestmark = pytest.mark.cuda
X = torch.tensor([[1, 5, 9, 13, 17, 21]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X.to(model.device)).logits.float().cpu()


def _cfg(model_dir, data_dir, out, **kw) -> FinetuneConfig:
    base = dict(out=str(out), model=model_dir, task="sst2", data_dir=data_dir, method="mezo", lr=1e-3, steps=2,
                batch_size=8, num_train=16, num_dev=4, num_test=6, eval_every=0, eval_batch_size=4, device="cuda")
    base.update(kw)
    return FinetuneConfig.of(**base)


def test_model_loads_on_cuda(tiny_llama_dir):
    cpu, _ = models.load(tiny_llama_dir)
    gpu, _ = models.load(tiny_llama_dir, device="cuda")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert torch.allclose(_logits(gpu), _logits(cpu), atol=1e-4)
    mapped, _ = models.load(tiny_llama_dir, dtype="bfloat16", device_map="auto")
    assert next(mapped.parameters()).device.type == "cuda" and _logits(mapped).isfinite().all()


def test_prune_on_cuda(tiny_llama_dir, tmp_path, capsys):
    from tests.conftest import CORPUS, write_jsonl

    write_jsonl(tmp_path / "c4" / "validation.jsonl", [{"text": t} for t in CORPUS * 4])
    for method in ("wanda", "sparsegpt", "wanda++"):
        out = tmp_path / method
        assert main(["prune", "--model", tiny_llama_dir, "--method", method, "--nm", "2:4", "--data-dir",
                     str(tmp_path), "--nsamples", "4", "--seqlen", "16", "--ro-rounds", "1", "--ro-samples", "2",
                     "--device", "cuda", "--out", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["sparsity"] == 0.5 and summary["device"].startswith("cuda"), method


def test_quantized_model_on_cuda(tiny_llama_dir, tmp_path):
    from zolm.quant import QuantConfig, QuantLinear, quantize_

    model, tok = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig())
    ref = _logits(model)
    models.save(model, tok, tmp_path / "q")
    gpu, _ = models.load(str(tmp_path / "q"), device="cuda")
    assert all(m.qweight.device.type == "cuda" for m in gpu.modules() if isinstance(m, QuantLinear))
    assert torch.allclose(_logits(gpu), ref, atol=1e-3)
    half, _ = models.load(str(tmp_path / "q"), dtype="bfloat16", device_map="auto")
    assert half(X.cuda()).logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


@pytest.mark.parametrize("method", ["mezo", "quzo"])
def test_two_zo_steps_on_cuda(method, tiny_llama_dir, data_dir, tmp_path):
    results = finetune(_cfg(tiny_llama_dir, data_dir, tmp_path / method, method=method))
    assert results["status"] == "done" and results["steps"] == 2
    if method == "mezo":
        base = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
        tuned = load_file(str(tmp_path / method / "model" / "model.safetensors"))
        assert max((tuned[k] - base[k]).abs().max().item() for k in base) > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_two_gpus_nccl(tiny_llama_dir, data_dir, tmp_path):
    one = _cfg(tiny_llama_dir, data_dir, tmp_path / "one", steps=3)
    finetune(one)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zolm",
            "finetune"]
    for k, v in _cfg(tiny_llama_dir, data_dir, tmp_path / "two", steps=3).to_dict().items():
        if v is not None and not isinstance(v, list | bool):
            argv += ["--" + k.replace("_", "-"), str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ZOLM_NO_PROGRESS="1")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["workers"] == 2
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
