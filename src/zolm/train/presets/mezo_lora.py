"""MeZO (LoRA) (Malladi et al. 2023, App. E): ZO-SGD over peft LoRA A and B, eps 1e-2."""

from zolm.train.parts import Preset

PRESET = Preset(
    "mezo-lora", "MeZO over LoRA adapters",
    train={"kind": "lora"}, estimator={"kind": "spsa", "eps": 1e-2}, optim={"kind": "sgd", "lr": 1e-4},
)
