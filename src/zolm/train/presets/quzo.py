"""QuZO (Zhou et al. 2025, papers.md section 4): ZO on low-bit codes, 4-bit perturbations by two independent
stochastic roundings, updates stochastically rounded onto the weight grid (the memory-lean true low-bit mode)."""

from zolm.train.parts import Preset

PRESET = Preset(
    "quzo", "QuZO: ZO on INT4/INT8/FP8 codes, quantized perturbations",
    base={"kind": "low-bit"},
    estimator={"kind": "spsa", "perturb_bits": 4, "two_draws": True, "update_rounding": "stochastic"},
    optim={"kind": "sgd", "lr": 1e-6},
)
