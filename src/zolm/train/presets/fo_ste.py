"""Quantization-aware first order: float32 masters, the forward sees their fake-quantized values, gradients
pass straight through (W + (Q(W) - W).detach()), AdamW; the result is saved quantized."""

from zolm.train.parts import Preset

PRESET = Preset(
    "fo-ste", "backprop + AdamW through fake-quant weights (STE)",
    base={"kind": "fake-quant"}, estimator={"kind": "backprop"}, optim={"kind": "adamw", "lr": 1e-5},
)
