"""`zolm prune` end to end on a tiny model, and its one-line errors (checked before the model loads)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import CORPUS, write_jsonl
from zolm.blocks import decoder_blocks, linear_layers
from zolm.cli import main
from zolm.compressed import is_compressed, load_compressed


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    write_jsonl(root / "c4" / "validation.jsonl", [{"text": t} for t in CORPUS * 4])
    return root


def test_prune_saves_reports_and_compresses(capsys, tiny_llama_dir, calib_dir, tmp_path):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", tiny_llama_dir, "--method", "wanda++", "--nm", "2:4", "--calib-data", "c4",
                 "--data-dir", str(calib_dir), "--nsamples", "4", "--seqlen", "16", "--ro-rounds", "2",
                 "--ro-samples", "2", "--out", str(out), "--compressed"])
    stdout = capsys.readouterr().out
    assert code == 0
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("block   0: q_proj 0.500 k_proj 0.500 v_proj 0.500 o_proj 0.500 gate_proj 0.500")
    assert "rel.err" in lines[0] and "RO round 1" in lines[0]
    summary = json.loads(lines[-1])
    assert summary["method"] == "wanda++" and summary["pattern"] == "2:4" and summary["sparsity"] == 0.5
    assert summary["calibration"]["nsamples"] == 4 and summary["compressed"]["bytes"] > 0
    report = json.loads((out / "prune_report.json").read_text())
    assert len(report["report"]["blocks"]) == 2 and report["report"]["config"]["ro_rounds"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    for block in decoder_blocks(model):
        for layer in linear_layers(block).values():
            assert torch.all((layer.weight == 0).view(layer.weight.shape[0], -1, 4).sum(-1) == 2)
    assert is_compressed(out / "compressed")
    again, _ = load_compressed(out / "compressed")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    text = tmp_path / "text.raw"
    text.write_text(" \n = A heading = \n The quick brown fox jumps over the lazy dog . \n" * 20)
    code = main(["eval", "--model", str(out), "--perplexity", str(text), "--seq-len", "32"])
    assert code == 0 and json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_ro_flags_reach_the_config(capsys, tiny_llama_dir, calib_dir, tmp_path):
    code = main(["prune", "--model", tiny_llama_dir, "--method", "wanda++", "--nm", "2:4", "--calib-data", "c4",
                 "--data-dir", str(calib_dir), "--nsamples", "4", "--seqlen", "16", "--ro-rounds", "2",
                 "--ro-samples", "2", "--ro-stats", "pass", "--ro-log-errors", "--out", str(tmp_path / "p")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and "RO round 1 " in lines[0] and "loss" not in lines[0]  # before -> after errors
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())["report"]
    assert report["config"]["ro_stats"] == "pass" and report["config"]["ro_log_errors"] is True
    assert {"rel_error_before", "rel_error_after", "rel_loss"} <= set(report["blocks"][0]["details"]["ro"][0])


def test_magnitude_needs_no_calibration_data(capsys, tiny_llama_dir, tmp_path):
    code = main(["prune", "--model", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.3", "--out",
                 str(tmp_path / "m")])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pattern"] == "0.3"


@pytest.mark.parametrize("argv,message", [
    (["--method", "obs"], "unknown pruning method 'obs'; valid: magnitude, sparsegpt, wanda, wanda++"),
    (["--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--nm", "3:2"], "N:M pattern '3:2' needs 0 < N < M"),
    (["--nm", "2-4"], "N:M pattern must look like 2:4"),
    (["--calib-data", "c4"], "calibration data 'c4' needs a data directory"),
    (["--calib-data", "{tmp}/none.jsonl"], "unknown calibration data"),
    (["--ro-samples", "0", "--method", "wanda++"], "ro_samples must be >= 1"),
    (["--dtype", "int3"], "unknown dtype 'int3'"),
    (["--nsamples", "0", "--calib-data", "{calib}/c4/validation.jsonl"], "need --nsamples >= 1"),
])
def test_bad_input_gets_one_line_before_loading(capsys, tmp_path, calib_dir, argv, message):
    argv = [a.format(tmp=tmp_path, calib=calib_dir) for a in argv]
    code = main(["prune", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("zolm: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "no such model" not in err


def test_sparsity_and_nm_are_exclusive(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["prune", "--sparsity", "0.5", "--nm", "2:4", "--out", str(tmp_path)])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
