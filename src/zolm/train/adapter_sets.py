"""Adapter trainable sets: peft LoRA and zolm's tensor-train adapters, over a float or a zolm low-bit base.

    lora   peft LoRA (r 8, alpha 16 on q_proj, v_proj by default) on nn.Linear layers, and on zolm QuantLinear
           layers through peft's custom-module hook (zolm.adapters.lora: the codes stay frozen, the adapter
           is float32); where the base is pruned the delta B A is masked (zolm.adapters.lora.mask_lora_)
    tt     tensor-train adapters (AdaZeta, zolm.adapters) on the placement's layers, float or QuantLinear

Adapters are initialised from generators seeded with the run seed, so rebuilding a run from its config (resume,
``zolm replay``) recreates the same start. Saving writes ``out/adapter`` (peft's format for LoRA) and
``out/model``: over a float base, LoRA merged into a plain float transformers model; over a low-bit base, a peft
LoRA directory holding that base in ``base/`` (zolm.adapters.lora: the grid is kept; ``zolm eval`` runs it,
``zolm export --format hf`` merges it into a float model); TT adapters merged when their activation is the
identity over a dense float base, else an adapter directory that
``zolm.adapters.load_model_with_adapters`` loads (over a low-bit base it holds that base in ``base/``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from zolm import models
from zolm.adapters import ADAPTER_PATTERN, TTAdapterConfig, add_tt_adapters, merge_adapters, save_adapters
from zolm.adapters.lora import mask_lora_, merged_lora_model, register_quant_lora, save_lora_over_base
from zolm.blocks import lora_targets
from zolm.errors import ZolmError
from zolm.quant.linear import QuantLinear
from zolm.train.config import FinetuneConfig
from zolm.train.sparsity import sparsity_masks
from zolm.train.trainables import Trainables

log = logging.getLogger(__name__)
LORA_PATTERN = r"\.lora_[AB]\."


def wrap_lora(model, config: FinetuneConfig):
    """``get_peft_model`` with the run's LoRA options; A is initialised from the run seed (global RNG forked)."""
    from peft import LoraConfig, get_peft_model

    opts = config.train.lora
    targets = list(opts.targets) or lora_targets(model)  # resolved from the architecture, the same on replay
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ZolmError(f"LoRA target module(s) {', '.join(missing)} not in the model; "
                        f"e.g.: {', '.join(sorted(n for n in names if 'proj' in n or 'fc' in n)[:12])}")
    lora = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")
    register_quant_lora(lora, model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora)


def save_lora_adapter(model, path: Path, base_model: str) -> None:
    """peft's save_pretrained, recording ``base_model`` (the id or path the user gave, e.g. ``smollm2-135m``) as
    ``base_model_name_or_path`` in adapter_config.json rather than wherever the weights were read from."""
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_model
    model.save_pretrained(path)


def lora_set(model, config: FinetuneConfig) -> Trainables:
    """LoRA A and B of every target layer; the base (float or low-bit codes) is frozen."""
    model = wrap_lora(model, config)
    low_bit = any(isinstance(m, QuantLinear) for m in model.modules())
    if config.base.keep_sparsity:
        mask_lora_(model)

    def save_model(m, path: Path, tok) -> None:
        if low_bit:  # the INT4/INT8 grid is kept only apart from the adapter (merged, the delta rounds away)
            save_lora_over_base(m, path, tok)
        else:
            models.save(merged_lora_model(m), tok, path)

    def save_extra(m, out: Path, tok) -> None:
        save_lora_adapter(m, out / "adapter", config.model)

    return Trainables(model, [LORA_PATTERN], save_model=save_model, save_extra=save_extra, lora=True)


def tt_config(config: FinetuneConfig) -> TTAdapterConfig:
    """The TT adapter configuration of a run (shapes, placement, initialisation seed)."""
    o = config.train.tt
    return TTAdapterConfig(rank=o.rank, bottleneck=o.bottleneck, modes=o.modes, activation=o.activation,
                           scaling=o.scaling, bias=o.bias, placement=list(o.placement),
                           hidden_modes=list(o.hidden_modes) or None, seed=config.seed, init=o.init)


def tt_set(model, config: FinetuneConfig) -> Trainables:
    """TT adapters on the placement's layers (everything else frozen)."""
    adapted = add_tt_adapters(model, tt_config(config))
    low_bit = config.base.kind == "low-bit"
    identity = config.train.tt.activation == "identity"
    # merging W' = W A (or A W) fills a pruned layer's zeros: keep the adapters apart where the zeros must stay
    pruned = config.base.keep_sparsity and any(
        sparsity_masks({"w": model.get_submodule(n).base_layer.weight}) for n in adapted if not low_bit)
    log.info("%d TT adapters (%s)", len(adapted), config.train.tt.activation)

    def save_model(m, path: Path, tok) -> None:
        if identity and not low_bit and not pruned:
            try:
                models.save(merge_adapters(copy.deepcopy(m)), tok, path)
                return
            except ZolmError as e:
                log.warning("could not merge the adapters (%s); writing an adapter directory instead", e)
        base = config.model
        if low_bit:  # the adapters were trained over these codes: keep them beside the adapters
            from zolm.adapters import remove_adapters

            base = str((Path(path) / "base").resolve())
            save_adapters(m, path, base_model=base, tokenizer=tok)
            models.save(remove_adapters(copy.deepcopy(m)), tok, Path(path) / "base")
            return
        save_adapters(m, path, base_model=base, tokenizer=tok)

    def save_extra(m, out: Path, tok) -> None:
        save_adapters(m, out / "adapter", base_model=config.model, tokenizer=tok)

    return Trainables(model, [ADAPTER_PATTERN], save_model=save_model, save_extra=save_extra)
