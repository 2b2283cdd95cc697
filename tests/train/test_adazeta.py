"""AdaZeta and the adapter baselines: query schedule, ZO on TT adapters, end-to-end runs, replay."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from zolm.adapters import is_adapter_dir, load_model_with_adapters
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.errors import ZolmError
from zolm.train.build import build_method, query_schedule
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune
from zolm.train.methods import StepBatch
from zolm.train.replay import replay
from zolm.zo.adazeta import QuerySchedule, fit_beta, queries_at

from .test_finetune import cfg


# ------------------------------------------------------------------------------------------ the schedule
def test_schedule_reproduces_the_worked_example_of_the_spec():
    """papers.md 6.4: 1000 train, batch 16, 10,000 steps (160 epochs), NUM 20, SHRINK 0.85, cap 15."""
    beta = fit_beta(20, 0.85, 160)
    assert beta == pytest.approx(0.622, abs=5e-4)
    q = [queries_at(e, 0.85, beta, 15) for e in range(160)]
    firsts = {v: q.index(v) for v in (1, 2, 3, 5, 10, 15)}
    assert firsts == {1: 0, 2: 4, 3: 8, 5: 18, 10: 53, 15: 101}
    assert q[:4] == [1, 1, 1, 1] and q[100] == 14 and set(q[101:]) == {15}
    assert q == sorted(q)
    # the same through a run config; zolm's epoch is (step - 1) // (1000 // 16) = 62 steps
    sched = query_schedule(FinetuneConfig.of(out="x", method="adazeta", steps=10_000, num_train=1000, q_max=15))
    assert sched.beta == pytest.approx(beta)
    mean_q = sum(sched((s - 1) // 62) for s in range(1, 10_001)) / 10_000
    assert mean_q == pytest.approx(11.0, abs=0.05)  # "~11x MeZO's forward passes for the same steps"


@pytest.mark.parametrize("alpha,beta,q_max", [(0.85, 0.45, 20), (0.85, 0.622, 15), (2.0, 1.0, 7), (0.5, 3.0, 4)])
def test_schedule_respects_q_max_and_never_drops_below_one(alpha, beta, q_max):
    q = [queries_at(e, alpha, beta, q_max) for e in range(5000)]
    assert min(q) == 1 and max(q) <= q_max and q == sorted(q)
    assert q[4999] == min(q_max, max(1, math.floor(alpha * 4999 ** beta)))
    assert QuerySchedule(kind="fixed", queries=3)(1000) == 3
    assert QuerySchedule(alpha=0.85, beta=0.45, q_max=20)(4) == math.floor(0.85 * 4 ** 0.45)


def test_schedule_and_adapter_options_are_validated():
    with pytest.raises(ZolmError, match="unknown q_schedule 'linear'; valid: adaptive, fixed"):
        FinetuneConfig.of(out="x", method="adazeta", q_schedule="linear")
    with pytest.raises(ZolmError, match="q_max must be >= 1"):
        FinetuneConfig.of(out="x", method="adazeta", q_max=0)
    with pytest.raises(ZolmError, match="q_alpha must be a positive number"):
        FinetuneConfig.of(out="x", method="adazeta", q_alpha=-1.0)
    with pytest.raises(ZolmError, match="unknown tt_activation 'gelu'"):
        FinetuneConfig.of(out="x", method="adazeta", tt_activation="gelu")
    with pytest.raises(ZolmError, match="tt_placement entry 'fc1' must look like"):
        FinetuneConfig.of(out="x", method="adazeta", tt_placement=["fc1"])
    with pytest.raises(ZolmError, match="--train-params does not apply to trainable tt"):
        FinetuneConfig.of(out="x", method="adazeta", train_params=["q_proj"])
    assert FinetuneConfig.of(out="x", method="mezo-lora").estimator.eps == 1e-2
    assert FinetuneConfig.of(out="x", method="adazeta").estimator.eps == 1e-3
    assert FinetuneConfig.of(out="x").estimator.eps == 1e-3


# ------------------------------------------------------------------------------------------ ZO on adapters
def _batch(model_dir, data_dir, n=8):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    split = load_splits("sst2", data_dir, 16, 4, 4, 0)
    items = encode_all(tok, split.train[:n], 256)
    return StepBatch(parts=[(0, training_batch(items, "classification", tok.pad_token_id))],
                     kinds=["classification"], weights=[1.0])


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
def test_zo_on_tt_adapters_lowers_the_loss_and_leaves_the_base_untouched(request, fixture, data_dir):
    model_dir = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = FinetuneConfig.of(out="x", model=model_dir, method="adazeta", lr=0.1, eps=1e-2, q_schedule="fixed",
                            queries=2, tt_rank=2, tt_bottleneck=8)
    method = build_method(model, config)
    batch = _batch(model_dir, data_dir)
    start = method.loss_fn(batch)()
    for step in range(1, 16):
        method.step(batch, step, config.optim.lr)
    assert method.loss_fn(batch)() < start - 0.03
    assert method.forwards_per_step == 4
    names = dict(method.model.named_parameters())
    for n, p in base.items():  # wrapped layers keep their weights under base_layer
        live = names.get(n) if n in names else names[n.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")]
        assert torch.equal(live, p), n
    assert all(".tt_adapter." in n for n in method.params.names)


# ------------------------------------------------------------------------------------------ end to end
def _records(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
@pytest.mark.parametrize("method,extra", [
    ("adazeta", dict(q_alpha=1.0, q_beta=1.0, q_max=3)), ("adazeta", dict(q_schedule="fixed", queries=2)),
    ("mezo-lora", {}), ("fo-tt", {})])
def test_each_adapter_method_runs_end_to_end(request, fixture, data_dir, tmp_path, method, extra):
    model_dir = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    results = finetune(cfg(model_dir, data_dir, out, method=method, lr=1e-2, steps=10, tt_rank=2, tt_bottleneck=8,
                           **extra))
    assert results["status"] == "done" and "accuracy" in results["after"]
    rows = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))
    if method == "adazeta":  # 16 train / batch 4: epochs of 4 steps; Q_e = min(max(e, 1), 3) or fixed 2
        expected = [min(max(r["epoch"], 1), 3) for r in rows] if "q_beta" in extra else [2] * 10
        assert [r["queries"] for r in rows] == expected
        assert [r["epoch"] for r in rows] == [(s - 1) // 4 for s in range(1, 11)]
        fwd = [0] + [r["forward_passes"] for r in rows]
        assert [b - a for a, b in zip(fwd, fwd[1:])] == [2 * q * 4 for q in expected]
    if method == "mezo-lora":
        from peft import PeftModel

        assert {r["queries"] for r in rows} == {1}
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
        tuned = AutoModelForCausalLM.from_pretrained(out / "model")
        orig = AutoModelForCausalLM.from_pretrained(model_dir)
        changed = [n for (n, a), b in zip(orig.named_parameters(), tuned.parameters()) if not torch.equal(a, b)]
        assert changed and all("q_proj" in n or "v_proj" in n for n in changed)
        assert json.loads((out / "run_config.json").read_text())["estimator"]["eps"] == 1e-2
    else:  # TT adapters: ReLU, so out/model is an adapter directory on the base model
        assert is_adapter_dir(out / "adapter") and is_adapter_dir(out / "model")
        assert not (out / "model" / "config.json").exists()
        model, _ = load_model_with_adapters(out / "model")
        saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if ".tt_adapter." in n)
        trainable = load_file(str(out / "checkpoint" / "weights.safetensors"))
        assert set(trainable) == set(saved) and all(".tt_adapter." in n for n in trainable)


def test_identity_adapters_save_a_merged_plain_model(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    finetune(cfg(tiny_llama_dir, data_dir, out, method="adazeta", lr=1e-2, tt_rank=2, tt_bottleneck=8,
                 tt_activation="identity", q_schedule="fixed"))
    adapted, tok = load_model_with_adapters(out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.tensor([[1, 5, 9, 23, 7, 40]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_adazeta_replay_is_bit_identical(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    results = finetune(cfg(tiny_llama_dir, data_dir, out, method="adazeta", lr=1e-2, steps=12, eval_every=4,
                           weight_decay=0.01, tt_rank=2, tt_bottleneck=8, q_alpha=1.0, q_beta=1.0, q_max=3))
    log = [json.loads(x) for x in (out / "replay.jsonl").read_text().splitlines()]
    assert {len(r["grads"]) for r in log if "grads" in r} == {1, 2}  # queries per step (seeds derive from the step)
    method, _, step = replay(out / "replay.jsonl", tiny_llama_dir)
    assert step == results["selected_step"]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    live = dict(method.model.named_parameters())
    assert saved and all(torch.equal(live[n], t) for n, t in saved.items())


def test_resume_equals_uninterrupted_for_adazeta(tiny_llama_dir, data_dir, tmp_path):
    from .test_finetune import Interrupt, _interrupt_at

    kw = dict(method="adazeta", lr=1e-2, steps=8, eval_every=2, tt_rank=2, tt_bottleneck=8, q_alpha=1.0, q_beta=1.0)
    finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "straight", **kw))
    broken = cfg(tiny_llama_dir, data_dir, tmp_path / "broken", **kw)
    with pytest.raises(Interrupt):
        finetune(broken, callbacks=[_interrupt_at(7)])
    finetune(broken)
    a, b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("straight", "broken"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_builds_adapter_flags():
    import argparse

    from zolm.cli import finetune as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--out", "o", "--method", "adazeta", "--tt-rank", "3", "--tt-placement",
                              "gate_proj:input", "down_proj:output", "--q-schedule", "fixed", "--no-tt-bias"])
    c = cli.config_from_args(args)
    tt = c.train.tt
    assert (tt.rank, tt.placement, c.estimator.schedule, tt.bias) == (3, ["gate_proj:input", "down_proj:output"],
                                                                   "fixed", False)
