"""The named methods: each preset is one short file naming its parts (zolm.train.parts.Preset).

The registry is an explicit dict, in the order ``--help`` lists them; presets import only zolm.train.parts.
"""

from zolm.train.parts import Preset
from zolm.train.presets import (
    adazeta,
    adazeta_int4,
    fo_adamw,
    fo_lora,
    fo_sgd,
    fo_ste,
    fo_tt,
    mazo,
    mezo,
    mezo_lora,
    mezo_magnitude_mask,
    mezo_random_mask,
    quant_mezo,
    quzo,
    quzo_lora,
)

PRESETS: dict[str, Preset] = {m.PRESET.name: m.PRESET for m in (
    mezo, fo_adamw, fo_sgd, fo_lora, quzo, quant_mezo, fo_ste, adazeta, mezo_lora, fo_tt, mazo, mezo_random_mask,
    mezo_magnitude_mask, quzo_lora, adazeta_int4)}
