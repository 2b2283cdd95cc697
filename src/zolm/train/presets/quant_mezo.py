"""The naive quantized ZO baseline: MeZO's unquantized perturbation on low-bit codes, updates rounded to
nearest (most of them round to zero)."""

from zolm.train.parts import Preset

PRESET = Preset(
    "quant-mezo", "naive quantized MeZO on low-bit codes",
    base={"kind": "low-bit"}, estimator={"kind": "spsa", "perturb_bits": 0, "update_rounding": "nearest"},
    optim={"kind": "sgd", "lr": 1e-6},
)
