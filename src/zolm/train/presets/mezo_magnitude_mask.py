"""MaZO's magnitude-mask baseline: the largest |W| of each row."""

from zolm.train.parts import Preset

PRESET = Preset(
    "mezo-magnitude-mask", "ZO over a magnitude mask",
    train={"kind": "mask", "mask": {"kind": "magnitude"}}, estimator={"kind": "spsa"},
    optim={"kind": "sgd", "lr": 1e-5},
)
