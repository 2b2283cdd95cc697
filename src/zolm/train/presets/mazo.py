"""MaZO (Zhang et al. 2025, papers.md 5.3-5.4): ZO perturbs and updates only an importance mask of rho of
each row of the block linears, chosen once from calibration gradients of every task."""

from zolm.train.parts import Preset

PRESET = Preset(
    "mazo", "MaZO: ZO over an importance mask",
    train={"kind": "mask", "mask": {"kind": "importance"}}, estimator={"kind": "spsa"},
    optim={"kind": "sgd", "lr": 1e-5},
)
