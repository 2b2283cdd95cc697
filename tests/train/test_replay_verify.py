"""The replay log proves itself: tampered logs, a wrong base and impossible steps are refused; rebuilt weights
are verified against the recorded hashes."""

import json
import shutil

import pytest
import torch

from zolm.errors import ZolmError
from zolm.train.loop import finetune
from zolm.train.replay import replay_verified
from zolm.zo.replay import FORMAT, link, read_log

from ..conftest import _save
from .test_finetune import cfg, weights


@pytest.fixture(scope="module")
def run(tiny_llama_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("replay-run") / "run"
    finetune(cfg(tiny_llama_dir, data_dir, out, lr=1e-3, steps=6, eval_every=2, weight_decay=0.1))
    return out


def lines(path):
    return path.read_text().splitlines()


def write(path, rows):
    path.write_text("".join(r + "\n" for r in rows))


def rechain(rows: list[str]) -> list[str]:
    """What a forger who recomputes the chain writes."""
    out = [rows[0]]
    for r in rows[1:]:
        rec = json.loads(r)
        rec["prev"] = link(out[-1])
        out.append(json.dumps(rec, separators=(",", ":")))
    return out


def copy_log(run, tmp_path, rows=None):
    """The run's directory copied (masks etc. live beside the log), with the log replaced by ``rows``."""
    d = tmp_path / "copy"
    shutil.copytree(run, d)
    if rows is not None:
        write(d / "replay.jsonl", rows)
    return d / "replay.jsonl"


def test_the_log_is_chained_small_and_replays_verified(run, tiny_llama_dir):
    log = read_log(run / "replay.jsonl")
    assert log.header["format"] == FORMAT and log.header["base_sha256"]
    assert [r["step"] for r in log.records] == [1, 2, 3, 4, 5, 6]
    assert all("seeds" not in r and len(r["prev"]) == 8 for r in log.records)  # seeds derive from the step
    assert {2, 4, 6} <= set(log.hashes)  # every checkpoint, and the end
    steps = [x for x in lines(run / "replay.jsonl") if '"grads"' in x]
    assert max(len(x) for x in steps) < 90
    r = replay_verified(run / "replay.jsonl", tiny_llama_dir)
    assert r.verified is True
    saved = weights(run)
    assert all(torch.equal(p, saved[n]) for n, p in r.method.model.named_parameters())
    assert replay_verified(run / "replay.jsonl", tiny_llama_dir, upto_step=4).verified is True
    assert replay_verified(run / "replay.jsonl", tiny_llama_dir, upto_step=3).verified is None


@pytest.mark.parametrize("tamper,message", [
    ("grad", "broken chain"), ("seed", "broken chain"), ("delete", "broken chain"),
    ("delete-rechained", "step 4 follows step 2"), ("grad-rechained", "do not match the hash"),
    ("seed-rechained", "do not match the hash"), ("after-end", "broken chain"),
])
def test_a_tampered_log_is_refused(run, tiny_llama_dir, tmp_path, tamper, message):
    rows = lines(run / "replay.jsonl")
    i = next(k for k, r in enumerate(rows) if json.loads(r).get("step") == 3 and "grads" in r)
    rec = json.loads(rows[i])
    if tamper.startswith("grad"):
        rec["grads"] = [rec["grads"][0] * 1.001]
        rows[i] = json.dumps(rec, separators=(",", ":"))
    elif tamper.startswith("seed"):
        rec["seeds"] = [12345]
        rows[i] = json.dumps(rec, separators=(",", ":"))
    elif tamper.startswith("delete"):
        del rows[i]
    else:
        rows.append(rows[i])
    if tamper.endswith("rechained"):
        rows = rechain(rows)
    with pytest.raises(ZolmError, match=message):
        upto = 6 if tamper in ("grad-rechained", "seed-rechained") else None  # the selected step may precede 3
        replay_verified(copy_log(run, tmp_path, rows), tiny_llama_dir, upto_step=upto)


def test_a_wrong_base_and_impossible_steps_are_refused(run, tiny_llama_dir, tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    other_dir = _save(other, tokenizer, tmp_path / "other")
    with pytest.raises(ZolmError, match="is not the one the run started from"):
        replay_verified(run / "replay.jsonl", other_dir)
    for step in (-1, 0, 7):
        with pytest.raises(ZolmError, match=rf"cannot replay to step {step}: the log holds steps 1..6"):
            replay_verified(run / "replay.jsonl", tiny_llama_dir, upto_step=step)


def test_a_v1_log_still_replays_unverified(run, tiny_llama_dir, tmp_path):
    from zolm.zo.rng import derive_seed

    log = read_log(run / "replay.jsonl")
    header = {k: v for k, v in log.header.items() if k != "base_sha256"}
    rows = [json.dumps({**header, "format": "zolm-replay-v1"})]
    for r in log.records:  # v1: seeds stored, no chain, no hashes
        seeds = [derive_seed(log.header["seed"], r["step"], q) for q in range(len(r["grads"]))]
        rows.append(json.dumps({"step": r["step"], "seeds": seeds, "grads": r["grads"], "lr": r["lr"]}))
    rows.append(json.dumps({"event": "end", "selected_step": log.selected}))
    r = replay_verified(copy_log(run, tmp_path, rows), tiny_llama_dir)
    assert r.verified is None
    saved = weights(run)
    assert all(torch.equal(p, saved[n]) for n, p in r.method.model.named_parameters())
