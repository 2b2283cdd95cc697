"""MeZO on a tiny Llama in bfloat16: exact mode follows float32, lean close, resume and replay exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_finetune import Interrupt, _interrupt_at, cfg, weights
from zolm import models
from zolm.data.encode import collate
from zolm.eval.scoring import task_loss
from zolm.train.loop import finetune
from zolm.train.replay import replay
from zolm.zo.optimizer import ZOConfig, ZOOptimizer
from zolm.zo.precision import MASTER_SUFFIX
from zolm.zo.spsa import ParamSet


def _curve(model_dir: str, dtype: str, mode: str, steps: int = 60) -> list[float]:
    model, tok = models.load(model_dir, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tok), (16, 12), generator=g)
    batch = collate(ids.tolist(), [1] * 16, pad_id=0)

    def loss() -> float:
        with torch.inference_mode():
            return float(task_loss(model, batch, "multiple_choice"))

    opt = ZOOptimizer(ParamSet(model), ZOConfig(eps=1e-2, seed=1, half_mode=mode, queries=4))
    losses = [opt.step(loss, s, 2e-3).loss for s in range(1, steps + 1)]
    return [sum(losses[i:i + 10]) / 10 for i in range(0, steps, 10)]


def test_bf16_exact_mode_follows_float32_and_lean_stays_close(tiny_llama_dir):
    fp32 = _curve(tiny_llama_dir, "float32", "exact")
    exact = _curve(tiny_llama_dir, "bfloat16", "exact")
    lean = _curve(tiny_llama_dir, "bfloat16", "lean")
    assert fp32[-1] < fp32[0] - 0.2, fp32  # the run learns
    # same seed, same z: exact mode's curve is float32's up to the bf16 forward (10-step means)
    assert max(abs(a - b) for a, b in zip(fp32, exact)) < 2e-3, (fp32, exact)
    assert max(abs(a - b) for a, b in zip(fp32, lean)) < 2e-2, (fp32, lean)
    assert lean[-1] < lean[0] - 0.2


@pytest.mark.parametrize("mode", ["exact", "lean"])
def test_bf16_resume_equals_uninterrupted_and_replay_is_exact(tiny_llama_dir, data_dir, tmp_path, mode):
    kw = dict(lr=1e-3, steps=6, eval_every=2, dtype="bfloat16", half_mode=mode)
    finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "straight", **kw))
    broken = cfg(tiny_llama_dir, data_dir, tmp_path / "broken", **kw)
    with pytest.raises(Interrupt):
        finetune(broken, callbacks=[_interrupt_at(5)])
    ckpt = load_file(str(tmp_path / "broken" / "checkpoint" / "weights.safetensors"))
    assert any(k.endswith(MASTER_SUFFIX) for k in ckpt) == (mode == "exact")
    finetune(broken)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.bfloat16 for k, v in a.items() if "weight" in k)
    header = json.loads((tmp_path / "straight" / "replay.jsonl").read_text().splitlines()[0])
    assert header["half_mode"] == mode
    method, _, _ = replay(tmp_path / "straight" / "replay.jsonl", tiny_llama_dir)
    for name, p in method.model.named_parameters():
        assert torch.equal(p, a[name]), name


def test_exact_mode_masters_cost_four_bytes_per_trained_half_weight(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir, "bfloat16")
    opt = ZOOptimizer(ParamSet(model, include=[r"mlp\."]), ZOConfig(half_mode="exact"))
    trained = sum(p.numel() for n, p in model.named_parameters() if "mlp." in n)
    assert opt.store.master_bytes() == 4 * trained
    lean = ZOOptimizer(ParamSet(model, include=[r"mlp\."]), ZOConfig(half_mode="lean"))
    assert lean.store.master_bytes() == 0
    lean.store.close()
