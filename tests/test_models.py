"""Loading and saving models: local directories, save/load round trips, the built-in GGUF model."""

import pytest
import torch

from zolm import models
from zolm.errors import ZolmError


def test_local_directory_round_trip_keeps_logits(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = models.load(tiny_llama_dir)
    assert not model.training and tok.padding_side == "left" and tok.pad_token_id is not None
    models.save(model, tok, tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".copy*")), "atomic save leaves no temporary directory behind"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    x = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)


def test_dtype_is_applied_and_checked(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ZolmError, match="unknown dtype 'int3'"):
        models.load(tiny_llama_dir, dtype="int3")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ZolmError, match="not a model directory"):
        models.load(str(tmp_path))


@pytest.mark.slow
def test_builtin_smollm2_loads_and_saves(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    models.save(model, tok, tmp_path / "smol")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    x = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)


@pytest.mark.slow
def test_smollm2_scores_a_handmade_set(smollm2):
    """The real model picks the obvious continuation on simple handmade prompts."""
    from zolm.data.encode import encode_all
    from zolm.data.templates import Example
    from zolm.eval.evaluate import evaluate_items

    model, tok = smollm2
    examples = [
        Example("The capital of France is", (" Paris", " banana"), 0),
        Example("Two plus two equals", (" seven", " four"), 1),
        Example("The opposite of hot is", (" cold", " purple"), 0),
        Example("Monday, Tuesday,", (" Saturday", " Wednesday"), 1),
        Example("The sun rises in the", (" east", " kitchen"), 0),
        Example("Water freezes at zero degrees", (" Celsius", " happiness"), 0),
    ]
    assert evaluate_items(model, tok, encode_all(tok, examples), "multiple_choice")["accuracy"] == 1.0


def test_device_map_loads_through_accelerate(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir, device_map={"": "cpu"})
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert model(torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, model.config.vocab_size)


def test_zo_refuses_parameters_offloaded_to_disk():
    from torch import nn

    from zolm.zo.spsa import ParamSet

    lin = nn.Linear(4, 4, device="meta")
    with pytest.raises(ZolmError, match="offloaded .*meta device"):
        ParamSet(lin)
