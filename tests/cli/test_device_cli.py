"""`--device cuda` on a machine without CUDA: one line `zolm: error: ...` and exit 2, for every subcommand."""

import pytest
import torch

from zolm import models
from zolm.cli import main
from zolm.errors import ZolmError


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("zolm: error: "), err
    return err[0]


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_finetune_and_prune_refuse_cuda_without_cuda(no_cuda, capsys, tiny_llama_dir, data_dir, tmp_path, device):
    line = _one_line_error(capsys, ["finetune", "--model", tiny_llama_dir, "--data-dir", data_dir,
                                    "--out", str(tmp_path / "ft"), "--device", device, "--steps", "1"])
    assert "CUDA is not available" in line
    line = _one_line_error(capsys, ["prune", "--model", tiny_llama_dir, "--method", "magnitude",
                                    "--out", str(tmp_path / "pr"), "--device", device])
    assert "CUDA is not available" in line and not (tmp_path / "pr").exists()


def test_unknown_device_name(capsys, tiny_llama_dir, tmp_path):
    line = _one_line_error(capsys, ["prune", "--model", tiny_llama_dir, "--method", "magnitude",
                                    "--out", str(tmp_path / "pr"), "--device", "gpu0"])
    assert "unknown device 'gpu0'" in line


def test_load_checks_the_device(no_cuda, tiny_llama_dir):
    with pytest.raises(ZolmError, match="CUDA is not available"):
        models.load(tiny_llama_dir, device="cuda")


def test_prune_runs_on_the_given_device_and_reports_it(capsys, tiny_llama_dir, tmp_path):
    import json

    assert main(["prune", "--model", tiny_llama_dir, "--method", "magnitude", "--out", str(tmp_path / "pr"),
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["sparsity"] == 0.5
