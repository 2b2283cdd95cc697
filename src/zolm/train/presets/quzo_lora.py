"""QuZO on LoRA (what QuZO's own LLM runs do): LoRA adapters over a frozen zolm low-bit base, their
perturbations quantized to 4 bits by two independent stochastic roundings, float adapter updates; eps 2e-3 as in
every QuZO LoRA script (papers.md 4.4), lr 1e-4 (MeZO-LoRA's; the scripts use 1e-5..1e-4)."""

from zolm.train.parts import Preset

PRESET = Preset(
    "quzo-lora", "QuZO over LoRA adapters on a low-bit base",
    base={"kind": "low-bit"}, train={"kind": "lora"},
    estimator={"kind": "spsa", "eps": 2e-3, "perturb_bits": 4, "two_draws": True}, optim={"kind": "sgd", "lr": 1e-4},
)
