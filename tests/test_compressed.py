"""Pruned models: save_pretrained loads in plain transformers with its zeros; the compressed form round-trips."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.prune.conftest import calib_ids, tiny_model
from zolm import models
from zolm.compressed import MANIFEST, WEIGHTS, decode, encode, is_compressed, load_compressed, save_compressed
from zolm.errors import ZolmError
from zolm.prune import PruneConfig, prune_


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_pruned_model_saves_and_loads_in_plain_transformers(kind, tmp_path, tokenizer):
    model = tiny_model(kind)
    prune_(model, PruneConfig(method="wanda", nm="2:4"), calib_ids(4, 8))
    models.save(model, tokenizer, tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    ids = calib_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("opt", torch.bfloat16)])
def test_compressed_round_trip_is_exact_and_smaller(kind, dtype, tmp_path, tokenizer):
    model = tiny_model(kind, hidden=64).to(dtype)
    prune_(model, PruneConfig(method="magnitude", sparsity=0.6))
    save_compressed(model, tokenizer, tmp_path / "c")
    models.save(model, tokenizer, tmp_path / "p")
    assert is_compressed(tmp_path / "c") and not is_compressed(tmp_path / "p")
    assert (tmp_path / "c" / WEIGHTS).stat().st_size < 0.8 * (tmp_path / "p" / "model.safetensors").stat().st_size
    loaded, tok = load_compressed(tmp_path / "c")
    assert type(loaded) is type(model) and tok is not None and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids = calib_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    encodings = {e["encoding"] for e in manifest["tensors"].values()}
    assert encodings == {"bitmap", "dense"}
    if kind == "llama":  # tied embedding / LM head stored once
        assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_encode_keeps_dense_tensors_dense_and_restores_exact_values():
    w = torch.randn(8, 16)
    w[w.abs() < 0.7] = 0.0  # about half zeros
    state = {"sparse": w, "dense": torch.randn(8, 16), "vector": torch.zeros(16), "ints": torch.arange(6).view(2, 3)}
    tensors, manifest = encode(state)
    assert manifest["tensors"]["sparse"]["encoding"] == "bitmap"
    assert {manifest["tensors"][k]["encoding"] for k in ("dense", "vector", "ints")} == {"dense"}
    assert tensors["sparse::bitmap"].dtype == torch.uint8 and tensors["sparse::bitmap"].numel() == 16
    back = decode(tensors, manifest)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_not_a_compressed_directory(tmp_path):
    with pytest.raises(ZolmError, match="is not a compressed zolm model"):
        load_compressed(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ZolmError, match="unsupported format 'other'"):
        load_compressed(tmp_path)
