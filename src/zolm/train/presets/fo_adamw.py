"""First-order full fine-tuning with AdamW (the FT baseline of MeZO's tables)."""

from zolm.train.parts import Preset

PRESET = Preset(
    "fo-adamw", "backprop + AdamW over all weights",
    estimator={"kind": "backprop"}, optim={"kind": "adamw", "lr": 1e-5},
)
