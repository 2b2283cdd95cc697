"""Faults under load: one writer per run directory, every interruption resumes with the same command, a full disk
or a non-finite update never costs the last good checkpoint."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from zolm.errors import ZolmError
from zolm.train import checkpoint as ckpt_mod
from zolm.train.loop import finetune
from zolm.train.rundir import LOCK

from .test_finetune import Interrupt, cfg, weights
from .test_finetune import _interrupt_at as interrupt_at

KW = dict(lr=1e-3, steps=5, eval_every=0, checkpoint_every=2, eval_before=False)


@pytest.fixture(scope="module")
def straight(tiny_llama_dir, data_dir, tmp_path_factory):
    """An uninterrupted run: what every interrupted one must end with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    finetune(cfg(tiny_llama_dir, data_dir, out, **KW))
    return out


def same_as(straight, out):
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "replay.jsonl").read_bytes() == (out / "replay.jsonl").read_bytes()
    assert (straight / "metrics.jsonl").read_bytes() == (out / "metrics.jsonl").read_bytes()


def test_interrupted_before_the_first_checkpoint_restarts(tiny_llama_dir, data_dir, tmp_path, straight):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        finetune(cfg(tiny_llama_dir, data_dir, out, **KW), callbacks=[interrupt_at(1)])
    assert not (out / "checkpoint").exists() and (out / "run_config.json").is_file()
    assert not (out / LOCK).exists()  # released on the way out
    finetune(cfg(tiny_llama_dir, data_dir, out, **KW))
    same_as(straight, out)


def resumed_from(caplog, step):
    assert f"from step {step}" in caplog.text, caplog.text


def test_relative_and_absolute_out_are_one_run(tiny_llama_dir, data_dir, tmp_path, straight, monkeypatch, caplog):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        finetune(cfg(tiny_llama_dir, data_dir, out, **KW), callbacks=[interrupt_at(3)])
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", "zolm.train.loop"):
        finetune(cfg(tiny_llama_dir, data_dir, "run", **KW))
    resumed_from(caplog, 2)
    same_as(straight, out)


def test_kill_between_the_renames_of_a_checkpoint_write(tiny_llama_dir, data_dir, tmp_path, straight, caplog):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        finetune(cfg(tiny_llama_dir, data_dir, out, **KW), callbacks=[interrupt_at(3)])
    os.replace(out / "checkpoint", out / ".checkpoint.old")  # what atomic_dir leaves between its renames
    (out / ".checkpoint.x1y2.tmp").mkdir()
    (out / ".checkpoint.x1y2.tmp" / "weights.safetensors").write_bytes(b"partial")
    (out / ".metrics.jsonl.abc.tmp").write_text("")
    with caplog.at_level("INFO", "zolm.train.loop"):
        finetune(cfg(tiny_llama_dir, data_dir, out, **KW))
    resumed_from(caplog, 2)
    same_as(straight, out)
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_llama_dir, data_dir, tmp_path, straight,
                                                               monkeypatch, caplog):
    out = tmp_path / "run"
    real, calls = ckpt_mod.save_file, []

    def full(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of step 4
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(ZolmError, match=r"could not write .*weights\.safetensors \(no space left on the device\)"):
        finetune(cfg(tiny_llama_dir, data_dir, out, **KW))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / LOCK).exists()
    monkeypatch.setattr(ckpt_mod, "save_file", real)  # space freed: the same command resumes
    with caplog.at_level("INFO", "zolm.train.loop"):
        finetune(cfg(tiny_llama_dir, data_dir, out, **KW))
    resumed_from(caplog, 2)
    same_as(straight, out)


def test_a_non_finite_update_is_never_checkpointed(tiny_llama_dir, data_dir, tmp_path, straight):
    out = tmp_path / "run"

    def blow_up(step, record):  # what an overflowing float16 update does to the weights
        if step == 4:
            with torch.no_grad():
                p = next(iter(model_params))
                p.fill_(float("inf"))

    import zolm.train.loop as loop

    real = loop.build_method
    model_params = []

    def build(model, config, run_dir=None):
        m = real(model, config, run_dir)
        model_params[:] = list(m.trainable.values())
        return m

    loop.build_method = build
    try:
        with pytest.raises(ZolmError, match=r"training diverged: .*not finite after step 4.*checkpoint.*\(step 2\)"):
            finetune(cfg(tiny_llama_dir, data_dir, out, **KW), callbacks=[blow_up])
    finally:
        loop.build_method = real
    saved, _ = ckpt_mod.load_checkpoint(out / "checkpoint")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    finetune(cfg(tiny_llama_dir, data_dir, out, **KW))  # resumes from step 2 and does not diverge again
    same_as(straight, out)


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tiny_llama_dir, data_dir, tmp_path, straight):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(f"{holder.pid} {os.uname().nodename}\n")
        with pytest.raises(ZolmError, match=rf"is in use by another zolm run \(pid {holder.pid}\)"):
            finetune(cfg(tiny_llama_dir, data_dir, out, **KW))
        with pytest.raises(ZolmError, match="in use by another zolm run"):  # --overwrite deletes nothing either
            finetune(cfg(tiny_llama_dir, data_dir, out, **KW), overwrite=True)
        assert (out / LOCK).is_file()
    finally:
        holder.kill()
        holder.wait()
    finetune(cfg(tiny_llama_dir, data_dir, out, **KW))  # the holder is gone: its lock is stale
    same_as(straight, out)
    assert not (out / LOCK).exists()


def test_a_directory_with_a_users_files_is_refused_even_with_a_run_config(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        finetune(cfg(tiny_llama_dir, data_dir, out, **KW), callbacks=[interrupt_at(1)])
    (out / "precious.txt").write_text("mine")
    with pytest.raises(ZolmError, match="exists and is not empty.*precious.txt"):
        finetune(cfg(tiny_llama_dir, data_dir, out, **KW))
    assert (out / "precious.txt").read_text() == "mine"
    with pytest.raises(ZolmError, match="--out .* is inside its input"):
        finetune(cfg(tiny_llama_dir, data_dir, os.path.join(tiny_llama_dir, "run"), **KW))
    with pytest.raises(ZolmError, match="--out .* is around its input"):
        finetune(cfg(tiny_llama_dir, data_dir, os.path.dirname(data_dir), **KW), overwrite=True)


def test_a_float16_divergence_leaves_a_finite_checkpoint(tiny_llama_dir, data_dir, tmp_path):
    """lr 1e3 in float16: step 1 is finite (checkpointed), step 2's loss is NaN; lr 1e6: step 1's update overflows
    and nothing is checkpointed. The last good checkpoint always holds finite weights and float32 masters."""
    kw = dict(KW, dtype="float16", checkpoint_every=1, num_dev=0)
    with pytest.raises(ZolmError, match=r"loss is not finite at step 2.*last good checkpoint: .*\(step 1\)"):
        finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "a", **dict(kw, lr=1e3)))
    saved, state = ckpt_mod.load_checkpoint(tmp_path / "a" / "checkpoint")
    assert state["step"] == 1 and any("@zo_master" in n for n in saved)
    assert all(torch.isfinite(t.float()).all() for t in saved.values())
    with pytest.raises(ZolmError, match=r"not finite after step 1 .*no checkpoint was written yet"):
        finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "b", **dict(kw, lr=1e6)))
    assert not (tmp_path / "b" / "checkpoint").exists()
