"""AdaZeta over an INT4 base: tensor-train adapters on frozen INT4 codes (groups of 32), adaptive queries."""

from zolm.train.parts import Preset

PRESET = Preset(
    "adazeta-int4", "AdaZeta's TT adapters over an INT4 base",
    base={"kind": "low-bit", "bits": 4}, train={"kind": "tt"}, estimator={"kind": "spsa", "schedule": "adaptive"},
    optim={"kind": "sgd", "lr": 1e-4},
)
