"""Parameter-efficient adapters: AdaZeta's tensor-train (TT) bottleneck adapters (papers.md 6.1-6.2), and
peft LoRA over zolm low-bit / pruned bases.

    from zolm.adapters import TTAdapterConfig, add_tt_adapters, save_adapters, load_adapters, merge_adapters
    add_tt_adapters(model, TTAdapterConfig(rank=5, bottleneck=64))   # only the adapters train
    save_adapters(model, "out/adapter")                               # adapter_config.json + safetensors
    load_adapters(base_model, "out/adapter"); merge_adapters(model)   # merge: identity activation only
    load_lora_model("run/model")       # peft LoRA over the low-bit base it was trained on (zolm.adapters.lora)
"""

from zolm.adapters.inject import (
    ADAPTER_PATTERN,
    PRESETS,
    TTAdapterConfig,
    TTAdapterLinear,
    adapter_layers,
    adapter_parameters,
    add_tt_adapters,
    default_placement,
    find_targets,
    merge_adapters,
    remove_adapters,
)
from zolm.adapters.lora import is_lora_dir, load_lora_model, merged_lora_model, save_lora_over_base
from zolm.adapters.serialize import (
    ADAPTER_TYPE,
    is_adapter_dir,
    load_adapters,
    load_model_or_adapters,
    load_model_with_adapters,
    read_adapter_config,
    save_adapters,
)
from zolm.adapters.tt import TTAdapter, TTLinear, factorize, tt_num_params
