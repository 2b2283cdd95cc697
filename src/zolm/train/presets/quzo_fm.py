"""QuZO's float-master regime (what its full-model LLaMA runs do, papers.md 4.4): float32 master weights, the
forward sees them rounded to nearest onto fixed INT4 scales (set once at the start), 4-bit perturbations by two
independent stochastic roundings, float updates (not re-quantized), linear learning-rate decay; saved as INT4
codes on the same scales. Costs a float copy of the weights (the memory-lean mode is ``quzo``)."""

from zolm.train.parts import Preset

PRESET = Preset(
    "quzo-fm", "QuZO on float masters through a fixed INT4 grid",
    base={"kind": "fake-quant", "fake_scales": "fixed"},
    estimator={"kind": "spsa", "perturb_bits": 4, "two_draws": True},
    optim={"kind": "sgd", "lr": 1e-6, "lr_schedule": "linear"},
)
