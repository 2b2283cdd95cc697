"""MaZO's random-mask baseline: the same ratio of random coordinates per row."""

from zolm.train.parts import Preset

PRESET = Preset(
    "mezo-random-mask", "ZO over a random mask",
    train={"kind": "mask", "mask": {"kind": "random"}}, estimator={"kind": "spsa"}, optim={"kind": "sgd", "lr": 1e-5},
)
