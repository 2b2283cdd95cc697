"""Quantized training methods end to end: quzo, quant-mezo and fo-ste save low-bit models; replay is exact."""

import pytest
import torch
from safetensors.torch import load_file

from zolm import models
from zolm.errors import ZolmError
from zolm.quant.serialize import WEIGHTS
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune
from zolm.train.replay import replay


def _cfg(model_dir, data_dir, out, **kw) -> FinetuneConfig:
    base = dict(out=str(out), model=model_dir, task="sst2", data_dir=data_dir, steps=4, batch_size=4, lr=1e-3,
                num_train=16, num_dev=4, num_test=6, eval_every=2, eval_batch_size=4, group_size=16)
    base.update(kw)
    return FinetuneConfig.of(**base)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


@pytest.mark.parametrize("method,kw", [("quzo", {"bits": 4}), ("quzo", {"bits": 8, "group_size": None}),
                                       ("quzo", {"format": "fp8", "group_size": None}), ("quant-mezo", {"bits": 4}),
                                       ("fo-ste", {"bits": 4})])
def test_quantized_methods_train_and_save_low_bit_models(tiny_llama_dir, data_dir, tmp_path, method, kw):
    out = tmp_path / "run"
    results = finetune(_cfg(tiny_llama_dir, data_dir, out, method=method, **kw))
    assert results["status"] == "done"
    model, _ = models.load(str(out / "model"))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    saved = load_file(str(out / "model" / WEIGHTS))
    assert saved["model.layers.0.mlp.up_proj.qweight"].dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)
    if method != "fo-ste":
        method_, _, step = replay(out / "replay.jsonl")
        assert step == results["selected_step"]
        rebuilt = method_.model.state_dict()
        assert all(torch.equal(_bits(saved[k]), _bits(rebuilt[k])) for k in saved)


def test_quantized_config_errors(tiny_llama_dir, data_dir, tmp_path):
    with pytest.raises(ZolmError, match="unsupported bit width 3"):
        _cfg(tiny_llama_dir, data_dir, tmp_path, method="quzo", bits=3)
    with pytest.raises(ZolmError, match="unknown format 'int3'"):
        _cfg(tiny_llama_dir, data_dir, tmp_path, method="quzo", format="int3")
    with pytest.raises(ZolmError, match="unknown update_rounding 'up'"):
        _cfg(tiny_llama_dir, data_dir, tmp_path, method="quzo", update_rounding="up")
