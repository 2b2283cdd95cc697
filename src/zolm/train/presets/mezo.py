"""MeZO (Malladi et al. 2023, Algorithm 1): ZO-SGD over every weight, in place, with the seed trick."""

from zolm.train.parts import Preset

PRESET = Preset(
    "mezo", "MeZO: ZO-SGD (SPSA) over all weights",
    estimator={"kind": "spsa"}, optim={"kind": "sgd", "lr": 1e-6},
)
