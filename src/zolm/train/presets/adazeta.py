"""AdaZeta (Yang et al. 2024, papers.md 6.3-6.4): ZO-SGD over tensor-train adapters with the adaptive query
schedule Q_e = min(max(floor(alpha e^beta), 1), Q_max)."""

from zolm.train.parts import Preset

PRESET = Preset(
    "adazeta", "AdaZeta: ZO on TT adapters, adaptive queries",
    train={"kind": "tt"}, estimator={"kind": "spsa", "schedule": "adaptive"}, optim={"kind": "sgd", "lr": 1e-4},
)
