"""First-order full fine-tuning with plain SGD (the FT-SGD baseline)."""

from zolm.train.parts import Preset

PRESET = Preset(
    "fo-sgd", "backprop + SGD over all weights",
    estimator={"kind": "backprop"}, optim={"kind": "sgd", "lr": 1e-3},
)
