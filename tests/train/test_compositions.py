"""Combinations of parts beyond the paper presets: LoRA and TT adapters over a low-bit base (codes frozen,
adapters train, replay bit-identical, saved models give the trained logits), first-order LoRA over INT4
(QLoRA-style) and ZO on fake-quantized float masters (QuZO's float-master regime)."""

import pytest
import torch

from zolm import models
from zolm.quant.linear import QuantLinear
from zolm.train.build import build_method
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune
from zolm.train.replay import replay


def cfg(model_dir, data_dir, out, **kw) -> FinetuneConfig:
    base = dict(out=str(out), model=model_dir, task="sst2", data_dir=data_dir, steps=3, batch_size=4, num_train=16,
                num_dev=4, num_test=4, eval_every=0, eval_before=False)
    return FinetuneConfig.from_dict({**base, **kw})


def codes(model) -> dict[str, torch.Tensor]:
    return {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model, ids=None) -> torch.Tensor:
    ids = torch.arange(1, 25).view(2, 12) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits.float()


def train_in_memory(config):
    """Build the method and run the loop's steps by hand, returning the method (its model stays usable)."""
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.train.methods import StepBatch

    model, tok = models.load(config.model)
    method = build_method(model, config)
    split = load_splits("sst2", config.data_dir, 16, 4, 4, 0)
    items = encode_all(tok, split.train, 64)
    for step in range(1, config.steps + 1):
        batch = training_batch(items[(step - 1) * 4:step * 4], split.task.kind, tok.pad_token_id)
        method.step(StepBatch(parts=[(0, batch)], kinds=[split.task.kind], weights=[1.0]), step, config.optim.lr)
    return method, tok


def test_quzo_lora_trains_adapters_over_frozen_codes_and_replays_bit_identically(tiny_llama_dir, data_dir, tmp_path):
    config = cfg(tiny_llama_dir, data_dir, tmp_path / "run", method="quzo-lora", lr=1e-2)
    model, _ = models.load(tiny_llama_dir)
    method = build_method(model, config)
    start_codes = codes(method.model)
    start = {k: v.clone() for k, v in method.trainable.items()}
    assert start_codes and all(".lora_" in k for k in start), "quzo-lora trains LoRA A/B only"
    assert type(method.optimizer).__name__ == "QuantizedDirectionZO"

    finetune(config)
    trained, tok = replay(tmp_path / "run" / "replay.jsonl", upto_step=3)[:2]
    end_codes = codes(trained.model)
    assert end_codes.keys() == start_codes.keys()
    assert all(torch.equal(start_codes[k], end_codes[k]) for k in start_codes), "the low-bit codes never change"
    moved = [k for k, v in trained.trainable.items() if not torch.equal(v, start[k])]
    assert moved, "the adapters train"
    from safetensors.torch import load_file

    ckpt = load_file(str(tmp_path / "run" / "checkpoint" / "weights.safetensors"))
    assert all(torch.equal(ckpt[k], v) for k, v in trained.trainable.items()), "replay == training, bit for bit"
    # the saved model keeps the frozen codes beside the adapter and gives the trained function; merged, a plain
    # float model with the same function (zolm export --format hf writes that one)
    from transformers import AutoModelForCausalLM

    from zolm.adapters import load_model_or_adapters

    saved, _ = load_model_or_adapters(str(tmp_path / "run" / "model"))
    saved_codes = list(codes(saved).values())
    assert len(saved_codes) == len(start_codes)
    assert all(torch.equal(a, b) for a, b in zip(start_codes.values(), saved_codes)), "the saved codes are the base's"
    assert torch.equal(logits(saved), logits(trained.model))
    merged, _ = load_model_or_adapters(str(tmp_path / "run" / "model"), merge=True)
    assert isinstance(merged, type(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)))
    assert torch.allclose(logits(merged), logits(trained.model), atol=1e-5)
    from peft import PeftModel

    assert isinstance(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                                tmp_path / "run" / "adapter"), PeftModel)


def test_quantized_perturbations_are_4_bit_levels_of_the_draw(tiny_llama_dir, data_dir, tmp_path):
    """u1 applied to the adapters takes at most 2^4 - 1 distinct values per tensor (levels x one coefficient)."""
    model, _ = models.load(tiny_llama_dir)
    method = build_method(model, cfg(tiny_llama_dir, data_dir, tmp_path / "x", method="quzo-lora"))
    before = [p.clone() for p in method.params.params]
    a = method.optimizer.apply_(12345, 1e-2)
    steps = [(p - b) for p, b in zip(method.params.params, before)]
    levels = torch.unique(torch.round(torch.cat([s.flatten() for s in steps]) / a * method.optimizer.settings.unit))
    assert levels.numel() <= 15 and levels.abs().max() <= 7
    method.optimizer.apply_(12345, -1e-2)
    assert all(torch.allclose(p, b, atol=1e-7) for p, b in zip(method.params.params, before))


def test_first_order_lora_over_an_int4_base(tiny_llama_dir, data_dir, tmp_path):
    """QLoRA-style: backprop + AdamW into LoRA adapters through frozen zolm INT4 codes."""
    config = cfg(tiny_llama_dir, data_dir, tmp_path / "x", method="fo-lora", base="low-bit", lr=1e-2)
    method, _ = train_in_memory(config)
    assert codes(method.model)
    trained = [n for n, p in method.trainable.items()]
    assert trained and all(".lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in method.trainable.items() if "lora_B" in n), "B moved off zero"


def test_zo_on_fake_quantized_float_masters(tiny_llama_dir, data_dir, tmp_path):
    """QuZO's float-master regime: float32 masters, forward through RTN-quantized weights, 4-bit perturbations."""
    config = cfg(tiny_llama_dir, data_dir, tmp_path / "run", method="mezo", base="fake-quant", perturb_bits=4,
                 lr=1e-2)
    results = finetune(config)
    assert results["status"] == "done"
    saved, _ = models.load(str(tmp_path / "run" / "model"))
    assert getattr(saved.config, "zolm_quantization", None), "saved quantized, as trained"


def test_adazeta_int4_saves_base_and_adapters_that_reload_exactly(tiny_llama_dir, data_dir, tmp_path):
    from zolm.adapters import load_model_with_adapters

    config = cfg(tiny_llama_dir, data_dir, tmp_path / "x", method="adazeta-int4", lr=1e-2)
    method, tok = train_in_memory(config)
    assert codes(method.model) and all(".tt_adapter." in n for n in method.trainable)
    method.save_model(tmp_path / "model", tok)
    loaded, _ = load_model_with_adapters(tmp_path / "model")
    assert torch.equal(logits(loaded), logits(method.model))


@pytest.mark.parametrize("method", ["mazo", "mezo-lora", "mezo-random-mask"])
def test_pruned_zeros_are_kept_by_masks_and_lora(tiny_llama_dir, data_dir, tmp_path, method):
    """Masks intersect the sparsity masks; a ZO LoRA delta is masked where its base is pruned (both moved pruned
    zeros before the parts were composed)."""
    model, tok = models.load(tiny_llama_dir)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        w[:, ::2] = 0.0
    models.save(model, tok, tmp_path / "pruned")
    finetune(cfg(str(tmp_path / "pruned"), data_dir, tmp_path / "run", method=method, lr=1e-1, mask_ratio=0.5,
                 mazo_calib_examples=8, mazo_calib_batch_size=4))
    out, _ = models.load(str(tmp_path / "run" / "model"))
    assert torch.all(out.model.layers[0].self_attn.q_proj.weight[:, ::2] == 0)


def test_identity_tt_adapters_over_a_pruned_base_are_not_merged(tiny_llama_dir, data_dir, tmp_path):
    """A merged identity adapter (W A) would fill the pruned zeros: the model is written as an adapter directory."""
    from zolm.adapters import is_adapter_dir

    model, tok = models.load(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, ::2] = 0.0
    models.save(model, tok, tmp_path / "pruned")
    finetune(cfg(str(tmp_path / "pruned"), data_dir, tmp_path / "run", method="adazeta", tt_activation="identity",
                 q_schedule="fixed", lr=1e-2))
    assert is_adapter_dir(tmp_path / "run" / "model")


def test_quzo_float_master_saves_exactly_what_its_forward_saw(tiny_llama_dir, data_dir, tmp_path):
    """quzo-fm: float masters, forward through a fixed INT4 grid, 4-bit quantized perturbations; the saved INT4
    codes on the same fixed scales give the trained forward's logits, and the scales never moved."""
    config = cfg(tiny_llama_dir, data_dir, tmp_path / "x", method="quzo-fm", lr=1e-2)
    model, _ = models.load(tiny_llama_dir)
    built = build_method(model, config).model
    start = {n: m.parametrizations.weight[0].scale.clone() for n, m in built.named_modules()
             if hasattr(m, "parametrizations")}
    method, tok = train_in_memory(config)
    assert type(method.optimizer).__name__ == "QuantizedDirectionZO"
    scales = {n: m.parametrizations.weight[0].scale for n, m in method.model.named_modules()
              if hasattr(m, "parametrizations")}
    assert scales.keys() == start.keys() and all(torch.equal(scales[n], start[n]) for n in start)
    trained = logits(method.model)
    method.save_model(tmp_path / "model", tok)
    saved, _ = models.load(str(tmp_path / "model"))
    assert getattr(saved.config, "zolm_quantization", None)
    assert torch.allclose(logits(saved), trained, atol=1e-5, rtol=0)


def test_quzo_float_master_from_a_low_bit_model_starts_on_its_grid(tiny_llama_dir, data_dir, tmp_path):
    """quzo-fm on a saved zolm INT4 model: float masters hold the dequantized codes and round onto the model's own
    scales, so the run starts exactly at the low-bit model's forward, and saves codes on those same scales."""
    from zolm.quant.linear import quantize_

    config = cfg(str(tmp_path / "int4"), data_dir, tmp_path / "x", method="quzo-fm", lr=1e-2)
    model, tok = models.load(tiny_llama_dir)
    quantize_(model, config.base.quant_config())
    models.save(model, tok, tmp_path / "int4")
    low, _ = models.load(str(tmp_path / "int4"))
    masters, _ = models.load(str(tmp_path / "int4"))
    built = build_method(masters, config).model
    assert not codes(built), "float masters, no codes"
    assert torch.allclose(logits(built), logits(low), atol=1e-5, rtol=0)
    scales = {n: m.scale for n, m in low.named_modules() if isinstance(m, QuantLinear)}
    method, tok = train_in_memory(config)
    method.save_model(tmp_path / "model", tok)
    saved, _ = models.load(str(tmp_path / "model"))
    for n, m in saved.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.scale, scales[n]), n
    assert not torch.equal(logits(saved), logits(low)), "trained"
    with pytest.raises(Exception, match="fixed scales"):
        build_method(models.load(str(tmp_path / "int4"))[0],
                     cfg(str(tmp_path / "int4"), data_dir, tmp_path / "y", method="fo-ste"))
