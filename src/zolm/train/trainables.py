"""The ``train`` part at run time: which tensors move, and how the result is written.

:func:`zolm.train.build.select` turns a model whose base weights are ready (zolm.train.base_weights) into
a :class:`Trainables`: the model to train and evaluate (a peft wrapper for LoRA, TT-adapted layers, ...),
regular expressions naming the trained parameters, optional update masks (MaZO and its baselines), and how to
save. The estimator part (zolm.train.methods) then trains exactly those tensors, keeping a pruned model's zeros
wherever ``base.keep_sparsity`` is set (zolm.train.sparsity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from zolm import models
from zolm.errors import ZolmError
from zolm.train.config import FinetuneConfig
from zolm.utils.patterns import compile_patterns

Saver = Callable[[nn.Module, Path, object], None]


@dataclass
class Trainables:
    """What a method trains.

    ``include``/``exclude`` select parameters by name (for ZO on low-bit codes: layers, see ``code_layers``);
    ``masks`` are update masks {parameter name: bool tensor}; ``save_model(model, path, tokenizer)`` writes the
    trained model, ``save_extra(model, out_dir, tokenizer)`` whatever else the run directory gets (adapters).
    """

    model: nn.Module
    include: list[str]
    exclude: list[str] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    save_model: Saver | None = None
    save_extra: Saver | None = None
    code_layers: list | None = None  # [(name, QuantLinear)] when the trained tensors are low-bit codes
    lora: bool = False  # LoRA keeps sparsity in its forward (masked delta), not through gradient masks


def save_plain(model, path: Path, tokenizer) -> None:
    models.save(model, tokenizer, path)


def all_set(model, config: FinetuneConfig) -> Trainables:
    """Every parameter matching ``train.params`` (default: all) but ``train.freeze``; on a low-bit base, the
    codes of every QuantLinear whose layer name matches."""
    t = config.train
    if config.trains_codes:
        from zolm.quant.linear import quantized_modules

        inc = compile_patterns(t.params, "--train-params")
        exc = compile_patterns(t.freeze, "--freeze-params")
        layers = [(n, m) for n, m in quantized_modules(model)
                  if (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)]
        if not layers:
            raise ZolmError("no quantized linear layer to train: check --train-params / --freeze-params")
        return Trainables(model, [], code_layers=layers, save_model=save_plain)
    saver = save_plain
    if config.base.kind == "fake-quant":
        def saver(m, path, tok):  # noqa: E306 - bake the masters, save quantized as trained
            from zolm.train.base_weights import bake_fake_quant_

            models.save(bake_fake_quant_(m, config), tok, path)
    return Trainables(model, list(t.params) or [".*"], list(t.freeze), save_model=saver)
