"""Every ZO method trains a model sharded with a device_map, exactly as it trains the plain model.

On the CPU the model is dispatched block by block (all blocks on "cpu", accelerate's hooks forced on), so the code
paths that meet a sharded model (hooks, execution devices, per-parameter devices) run; the replay log and saved
weights must equal those of a run on the undispatched model.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zolm import models
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune
from zolm.utils.devices import place_

ZO_METHODS = ["mezo", "quzo", "quant-mezo", "mazo", "mezo-random-mask", "mezo-magnitude-mask", "adazeta",
              "mezo-lora"]


def per_block_map(model) -> dict:
    names = [n for n, _ in model.named_children()]
    assert names == ["model", "lm_head"], names
    inner = [f"model.{n}" for n, _ in model.model.named_children() if n != "layers"]
    return {**dict.fromkeys(inner, "cpu"), **{f"model.layers.{i}": "cpu" for i in range(len(model.model.layers))},
            "lm_head": "cpu"}


@pytest.fixture
def sharded_loads(monkeypatch):
    real = models.load
    dispatched = []

    def load(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        dispatched.append(model)
        return place_(model, device_map=per_block_map(model), force_hooks=True), tok

    monkeypatch.setattr(models, "load", load)
    return dispatched


def _cfg(model_dir, data_dir, out, method, **kw) -> FinetuneConfig:
    base = dict(out=str(out), model=model_dir, task="sst2", data_dir=data_dir, method=method, steps=2, batch_size=4,
                num_train=16, num_dev=4, num_test=4, eval_every=0, eval_batch_size=4, eval_before=False,
                mazo_calib_examples=8, mazo_calib_batch_size=4, tt_rank=2, tt_bottleneck=8, q_schedule="fixed")
    base.update(kw)
    return FinetuneConfig.of(**base)


def _replay(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "replay.jsonl").read_text().splitlines()[1:]]
    return [{k: v for k, v in r.items() if k in ("step", "seeds", "grads", "lr")} for r in lines]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}:{k}": v for f in sorted((out / "model").glob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
@pytest.mark.parametrize("method", ZO_METHODS)
def test_zo_method_trains_a_sharded_model_like_a_plain_one(method, tiny_llama_dir, data_dir, tmp_path,
                                                           monkeypatch, request):
    plain = tmp_path / "plain"
    finetune(_cfg(tiny_llama_dir, data_dir, plain, method))
    dispatched = request.getfixturevalue("sharded_loads")
    sharded = tmp_path / "sharded"
    results = finetune(_cfg(tiny_llama_dir, data_dir, sharded, method))
    assert dispatched and hasattr(dispatched[0].model.layers[0], "_hf_hook"), "the run saw a dispatched model"
    assert results["status"] == "done"
    assert len(_replay(plain)) >= 2 and _replay(plain) == _replay(sharded)
    a, b = _weights(plain), _weights(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_device_map_auto_trains(tiny_llama_dir, data_dir, tmp_path):
    results = finetune(_cfg(tiny_llama_dir, data_dir, tmp_path / "auto", "mezo", device_map="auto"))
    assert results["status"] == "done" and results["steps"] == 2
