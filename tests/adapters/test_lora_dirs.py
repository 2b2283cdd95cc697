"""LoRA over a low-bit (and pruned) base saves as a peft LoRA directory holding that base: the grid and the zeros
are kept, zolm loads it back to the trained function, merging gives the plain float model."""

import json

import pytest
import torch

from zolm import models
from zolm.adapters import is_lora_dir, load_lora_model, load_model_or_adapters
from zolm.errors import ZolmError
from zolm.prune.api import PruneConfig, prune_
from zolm.quant import QuantConfig, QuantFormat, QuantLinear, quantize_
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune
from zolm.utils.sparse import unpack_mask

IDS = torch.arange(1, 25).view(2, 12)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _state(model) -> dict[str, torch.Tensor]:
    return {f"{n.replace('.base_layer', '')}.{k}": b.clone() for n, m in model.named_modules()
            if isinstance(m, QuantLinear) for k, b in m.named_buffers(recurse=False)}


@pytest.fixture
def pruned_int4_dir(tiny_llama_dir, tmp_path):
    model, tok = models.load(tiny_llama_dir)
    prune_(model, PruneConfig(method="magnitude", nm="2:4"))
    quantize_(model, QuantConfig(weight=QuantFormat("int", 4, group_size=16), embed_bits=8))
    models.save(model, tok, tmp_path / "int4")
    return str(tmp_path / "int4")


def _train(model_dir, data_dir, out, method="fo-lora"):
    cfg = FinetuneConfig.of(out=str(out), model=model_dir, task="sst2", data_dir=data_dir, method=method,
                            base="low-bit", bits=4, group_size=16, steps=3, batch_size=4, num_train=16, num_dev=4,
                            num_test=4, eval_every=0, eval_before=False, lr=5e-2)
    return finetune(cfg)


def test_lora_over_pruned_int4_keeps_grid_and_zeros_and_reloads_the_trained_function(pruned_int4_dir, data_dir,
                                                                                    tmp_path):
    _train(pruned_int4_dir, data_dir, tmp_path / "run")
    folder = tmp_path / "run" / "model"
    assert is_lora_dir(folder) and (folder / "base" / "config.json").is_file()
    start, _ = models.load(pruned_int4_dir)
    loaded, _ = load_model_or_adapters(str(folder))
    base_state = _state(loaded.get_base_model())
    assert base_state.keys() == _state(start).keys()
    assert all(torch.equal(v, _state(start)[k]) for k, v in base_state.items()), "codes, scales, masks unchanged"
    assert not torch.allclose(_logits(loaded), _logits(start)), "the adapter changed the function"
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["base_model_name_or_path"].endswith("base")
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(folder)).r == 8  # peft reads the adapter's files

    merged, _ = load_model_or_adapters(str(folder), merge=True)
    assert not any(isinstance(m, QuantLinear) for m in merged.modules()), "merged: a plain float model"
    assert torch.allclose(_logits(merged), _logits(loaded), atol=1e-4)
    for name, mod in start.named_modules():  # every pruned zero is still zero after merging the masked delta
        if isinstance(mod, QuantLinear) and mod.sparsity_mask is not None:
            kept = unpack_mask(mod.sparsity_mask, mod.out_features * mod.in_features).view_as(mod.dequantize())
            w = merged.get_submodule(name).weight
            assert (w[~kept] == 0).all() and (w[kept] != 0).float().mean() > 0.9, name


def test_the_saved_folder_equals_the_trained_model_and_moves_with_its_run(pruned_int4_dir, data_dir, tmp_path):
    """The loaded folder gives the run's final model bit for bit (from its base/, even after the run moved)."""
    _train(pruned_int4_dir, data_dir, tmp_path / "run", method="quzo-lora")
    ref = _logits(load_lora_model(tmp_path / "run" / "model")[0])
    (tmp_path / "run").rename(tmp_path / "moved")
    assert torch.equal(_logits(load_lora_model(tmp_path / "moved" / "model")[0]), ref)


def test_a_lora_folder_over_the_wrong_base_is_a_one_line_error(pruned_int4_dir, data_dir, tmp_path, tiny_opt_dir):
    _train(pruned_int4_dir, data_dir, tmp_path / "run")
    with pytest.raises(ZolmError, match="does not fit its base"):
        load_lora_model(tmp_path / "run" / "model", base_model=tiny_opt_dir)
    with pytest.raises(ZolmError, match="not a peft LoRA directory"):
        load_lora_model(tmp_path)
    with pytest.raises(ZolmError, match="is an adapter folder, not a model: zolm eval"):
        models.load(str(tmp_path / "run" / "model"))
