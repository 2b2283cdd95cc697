"""End-to-end fine-tuning on tiny models: every method, resume == uninterrupted, replay, divergence."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zolm.errors import ZolmError
from zolm.train.batches import batch_indices
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune
from zolm.train.replay import replay


def cfg(model_dir, data_dir, out, **kw) -> FinetuneConfig:
    base = dict(out=str(out), model=model_dir, task="sst2", data_dir=data_dir, steps=4, batch_size=4,
                num_train=16, num_dev=4, num_test=6, eval_every=2, eval_batch_size=4)
    base.update(kw)
    return FinetuneConfig.of(**base)


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model" / "model.safetensors"))


@pytest.mark.parametrize("method,lr", [("mezo", 1e-3), ("fo-adamw", 1e-3), ("fo-sgd", 1e-2), ("fo-lora", 1e-3)])
def test_every_method_trains_and_saves_a_plain_transformers_model(tiny_llama_dir, data_dir, tmp_path, method, lr):
    from transformers import AutoModelForCausalLM

    results = finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "run", method=method, lr=lr))
    out = tmp_path / "run"
    for name in ("results.json", "metrics.jsonl", "loss.png", "run_config.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    assert results["status"] == "done" and "accuracy" in results["before"] and "accuracy" in results["after"]
    assert (out / "replay.jsonl").is_file() == (method == "mezo")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    changed = [n for (n, a), b in zip(base.named_parameters(), tuned.parameters()) if not torch.equal(a, b)]
    assert changed, "training must change the saved weights"
    if method == "fo-lora":
        from peft import PeftModel

        assert all("q_proj" in n or "v_proj" in n for n in changed), "merged LoRA touches only its targets"
        PeftModel.from_pretrained(base, out / "adapter")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert any("dev_accuracy" in r for r in lines)


def test_opt_models_train_too(tiny_opt_dir, data_dir, tmp_path):
    results = finetune(cfg(tiny_opt_dir, data_dir, tmp_path / "opt", lr=1e-3))
    assert results["status"] == "done"


class Interrupt(Exception):
    pass


def _interrupt_at(step):
    def cb(s, record):
        if s == step:
            raise Interrupt
    return cb


@pytest.mark.parametrize("method", ["mezo", "fo-adamw"])
def test_resume_equals_uninterrupted(tiny_llama_dir, data_dir, tmp_path, method):
    kw = dict(method=method, lr=1e-3, steps=6, eval_every=2)
    finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "straight", **kw))
    broken = cfg(tiny_llama_dir, data_dir, tmp_path / "broken", **kw)
    with pytest.raises(Interrupt):
        finetune(broken, callbacks=[_interrupt_at(5)])
    assert json.loads((tmp_path / "broken" / "checkpoint" / "state.json").read_text())["step"] == 4
    finetune(broken)  # same config, same directory: resumes from step 4
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def records(run, log):
        rows = [json.loads(x) for x in (tmp_path / run / log).read_text().splitlines()]
        for r in rows:
            r.get("config", {}).pop("out", None)  # the replay header names the run directory
        return rows

    for log in ("metrics.jsonl",) + (("replay.jsonl",) if method == "mezo" else ()):
        assert records("straight", log) == records("broken", log)


def test_replay_rebuilds_the_selected_weights_bit_for_bit(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    results = finetune(cfg(tiny_llama_dir, data_dir, out, lr=1e-3, steps=6, eval_every=2, weight_decay=0.1))
    method, _, step = replay(out / "replay.jsonl", tiny_llama_dir)
    model = method.model
    assert step == results["selected_step"]
    saved = weights(out)
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name
    assert (out / "replay.jsonl").stat().st_size < 4096


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    import zolm.train.methods as methods

    real, calls = methods.task_loss_sum, {"n": 0}

    def flaky(model, batch, kind):
        calls["n"] += 1
        loss = real(model, batch, kind)
        return loss * float("nan") if calls["n"] > 6 else loss  # steps 1-3 fine (2 forwards each)

    monkeypatch.setattr(methods, "task_loss_sum", flaky)
    out = tmp_path / "run"
    with pytest.raises(ZolmError, match=r"training diverged: loss is not finite at step 4.*checkpoint.*\(step 3\)"):
        finetune(cfg(tiny_llama_dir, data_dir, out, steps=6, eval_every=0, checkpoint_every=1, eval_before=False))
    assert json.loads((out / "results.json").read_text())["status"] == "diverged"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3


def test_run_directory_guards(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ZolmError, match="exists and is not empty; use --overwrite"):
        finetune(cfg(tiny_llama_dir, data_dir, out))
    finetune(cfg(tiny_llama_dir, data_dir, out, steps=2), overwrite=True)
    with pytest.raises(ZolmError, match=r"another config \(differs in: optim.lr\)"):
        finetune(cfg(tiny_llama_dir, data_dir, out, steps=2, lr=0.5))
    # options of parts the run does not use (MeZO: the mask, LoRA, TT and quantization options) do not count
    unused = dict(mazo_curvature="fisher", lora_r=4, tt_rank=3, bits=8)
    assert finetune(cfg(tiny_llama_dir, data_dir, out, steps=2, **unused))["status"] == "done"
    with pytest.raises(ZolmError, match=r"another config \(differs in: .*method.*train.kind, train.lora\)"):
        finetune(cfg(tiny_llama_dir, data_dir, out, steps=2, method="mezo-lora"))


def test_config_validation():
    valid = ("adazeta, adazeta-int4, fo-adamw, fo-lora, fo-sgd, fo-ste, fo-tt, mazo, mezo, mezo-lora, "
             "mezo-magnitude-mask, mezo-random-mask, quant-mezo, quzo, quzo-fm, quzo-lora")
    with pytest.raises(ZolmError, match=f"unknown method 'sgd'; valid: {valid}"):
        FinetuneConfig.of(out="x", method="sgd")
    with pytest.raises(ZolmError, match="steps must be >= 1"):
        FinetuneConfig.of(out="x", steps=0)
    with pytest.raises(ZolmError, match="lr must be a positive number"):
        FinetuneConfig.of(out="x", lr=-1.0)
    with pytest.raises(ZolmError, match="unknown key 'learning_rate'; valid: .*lr"):
        FinetuneConfig.from_dict({"learning_rate": 1.0})
    assert FinetuneConfig.of(out="x", method="fo-adamw").optim.lr == 1e-5


def test_config_files(tmp_path):
    (tmp_path / "c.yaml").write_text("task: rte\nmethod: mezo\nlr: 2.0e-6\n")
    c = FinetuneConfig.from_file(tmp_path / "c.yaml", out="o", lr=None, steps=7)
    assert (c.task, c.optim.lr, c.steps) == ("rte", 2e-6, 7)
    (tmp_path / "c.json").write_text('{"task": "cb", "queries": 2}')
    assert FinetuneConfig.from_file(tmp_path / "c.json", out="o").estimator.queries == 2
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ZolmError, match="bad.yaml: cannot parse config"):
        FinetuneConfig.from_file(tmp_path / "bad.yaml")


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [batch_indices(10, 4, 0, s)[0] for s in range(1, 7)]
    assert a == [batch_indices(10, 4, 0, s)[0] for s in range(1, 7)]
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1])) and len(a[0]) == 4
    assert [batch_indices(10, 4, 0, s)[1] for s in range(1, 7)] == [0, 0, 1, 1, 2, 2]
