"""First-order LoRA (Hu et al. 2022) through peft: r 8, alpha 16 on q_proj and v_proj, AdamW."""

from zolm.train.parts import Preset

PRESET = Preset(
    "fo-lora", "backprop + AdamW over LoRA adapters",
    train={"kind": "lora"}, estimator={"kind": "backprop"}, optim={"kind": "adamw", "lr": 1e-4},
)
