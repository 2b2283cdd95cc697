"""First-order (AdamW) training of the same tensor-train adapters as AdaZeta, base frozen."""

from zolm.train.parts import Preset

PRESET = Preset(
    "fo-tt", "backprop + AdamW over TT adapters",
    train={"kind": "tt"}, estimator={"kind": "backprop"}, optim={"kind": "adamw", "lr": 1e-3},
)
