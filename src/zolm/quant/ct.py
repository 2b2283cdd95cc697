"""zolm's INT models as compressed-tensors ``pack-quantized`` folders (what llm-compressor writes; transformers
and vLLM load them), and back.

Layout (compressed-tensors 0.20, ``compressors/pack_quantized``): config.json carries a ``quantization_config``
with ``quant_method: compressed-tensors``, ``format: pack-quantized``, ``quantization_status: compressed`` and one
config group targeting ``Linear`` (INT ``num_bits`` 4 or 8, symmetric, strategy ``group`` with ``group_size``, or
``channel``); each quantized linear layer NAME stores

    NAME.weight_packed  int32, codes + 2^(b-1) packed 32 / b per word (compressed_tensors' pack_to_int32)
    NAME.weight_scale   float32 [out, groups]         W = weight_scale * code, exactly zolm's dequantized W
    NAME.weight_shape   int64 [2]

Everything else (norms, biases, an untied LM head) is float. transformers cannot load a quantized embedding
from compressed-tensors, so zolm's INT embedding is stored dequantized (float32: s * q exactly); zolm re-derives
its codes on load and keeps the stored codes in ``zolm_extra.safetensors`` (with pruning masks) whenever the
re-derivation would not give them back bit for bit. config.json also keeps ``zolm_quantization``, which other
tools ignore. :func:`load_ct` reads these folders and also llm-compressor's symmetric INT checkpoints.

Pruned models: the zeros are zero codes inside the packed values (a pruned weight quantizes to code 0), so every
loader sees them. The sparsity is declared as the quantization_config's ``sparsity_config`` in the one form
compressed-tensors 0.20 still defines without calling it legacy: ``format: dense`` (values stored whole, no
bitmask) with ``sparsity_structure`` ``2:4`` or ``unstructured`` and the ``global_sparsity`` of the quantized
layers. It is metadata: transformers ignores it, and the compressed 2:4 formats that sparse kernels read
(``sparse-24-bitmask``, ``marlin-24``) are legacy in 0.20, whose own ModelCompressor neither writes nor loads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from zolm.errors import ZolmError
from zolm.quant.formats import QuantConfig, QuantFormat
from zolm.quant.linear import QuantEmbedding, QuantLinear, quantize_
from zolm.quant.primitives import codes_to_float, float_to_codes
from zolm.utils.io import atomic_dir, atomic_write_json

EXTRA = "zolm_extra.safetensors"


def is_ct_dir(path: str | os.PathLike) -> bool:
    """True if ``path/config.json`` declares a compressed-tensors quantization."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
    return q.get("quant_method") == "compressed-tensors"


def _scheme_args(fmt: QuantFormat) -> dict:
    if fmt.kind != "int":
        raise ZolmError(f"compressed-tensors pack-quantized holds INT weights, not {fmt.name}")
    return {"num_bits": fmt.bits, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "group" if fmt.group_size else "channel", "group_size": fmt.group_size}


def quantization_config(fmt: QuantFormat, ignore: list[str]) -> dict:
    """The ``quantization_config`` dict (built and validated by compressed_tensors' own QuantizationConfig)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**_scheme_args(fmt)))
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                            quantization_status="compressed", ignore=ignore)
    return json.loads(qc.model_dump_json())


def sparsity_config(layers: dict[str, QuantLinear]) -> dict | None:
    """``sparsity_config`` for layers that carry pruning masks (None when none does), validated by
    compressed-tensors' own DenseSparsityConfig: the structure is 2:4 when every group of 4 consecutive inputs
    keeps at most 2 weights in every masked layer."""
    from compressed_tensors.config import DenseSparsityConfig

    from zolm.utils.sparse import unpack_mask

    masked = {n: m for n, m in layers.items() if m.sparsity_mask is not None}
    if not masked:
        return None
    kept, total, two_four = 0, sum(m.in_features * m.out_features for m in layers.values()), True
    for m in masked.values():
        mask = unpack_mask(m.sparsity_mask.cpu(), m.in_features * m.out_features)
        kept += int(mask.sum())
        two_four = two_four and m.in_features % 4 == 0 and bool((mask.view(-1, 4).sum(1) <= 2).all())
    dense = sum(m.in_features * m.out_features for n, m in layers.items() if n not in masked)
    targets = ["Linear"] if len(masked) == len(layers) else sorted(masked)
    cfg = DenseSparsityConfig(global_sparsity=round(1 - (kept + dense) / total, 6), targets=targets,
                              ignore=["lm_head"], sparsity_structure="2:4" if two_four else "unstructured")
    return json.loads(cfg.model_dump_json())


def save_ct(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write a zolm INT model (no activation quantization) as a pack-quantized folder, atomically."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file

    settings = getattr(model.config, "zolm_quantization", None)
    if not settings:
        raise ZolmError("compressed-tensors export needs a model quantized by zolm (zolm quantize)")
    qc = QuantConfig.from_dict({k: v for k, v in settings.items() if k != "tied_head"})
    if qc.act_bits is not None:
        raise ZolmError("compressed-tensors pack-quantized has no fake-quantized activations (act_bits); "
                        "export with --format hf or gguf")
    qconf = quantization_config(qc.weight, ["lm_head"])
    state: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, mod in layers.items():
        codes = codes_to_float(mod.qweight, mod.fmt).to(torch.int8).cpu()
        state[f"{name}.weight_packed"] = pack_to_int32(codes, mod.fmt.bits)
        state[f"{name}.weight_scale"] = mod.scale.detach().float().cpu().contiguous()
        state[f"{name}.weight_shape"] = torch.tensor(list(codes.shape))
        if mod.sparsity_mask is not None:
            extra[f"{name}.sparsity_mask"] = mod.sparsity_mask.cpu()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, p in model.named_parameters():
        if not (tied and name == "lm_head.weight"):  # transformers re-ties it
            state[name] = p.detach().cpu().contiguous()
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        key = next(n for n, m in model.named_modules() if m is emb) + ".weight"
        state[key] = emb.weight.detach().cpu().contiguous()
        again = QuantEmbedding.from_embedding(torch.nn.Embedding.from_pretrained(state[key]), emb.fmt.bits,
                                              bool(emb.fmt.fp16_scales))
        if not (torch.equal(again.qweight, emb.qweight.cpu()) and torch.equal(again.scale, emb.scale.cpu())):
            extra[key.replace(".weight", ".qweight")] = emb.qweight.cpu()
            extra[key.replace(".weight", ".scale")] = emb.scale.cpu()
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        cfg["quantization_config"] = qconf
        sparse = sparsity_config(layers)
        if sparse is not None:
            cfg["quantization_config"]["sparsity_config"] = sparse
        atomic_write_json(tmp / "config.json", cfg)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra:
            save_file(extra, str(tmp / EXTRA), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def _settings_from_ct(qconf: dict) -> dict:
    """zolm QuantConfig settings for a foreign compressed-tensors checkpoint (one symmetric INT Linear group)."""
    groups = list((qconf.get("config_groups") or {}).values())
    w = (groups[0].get("weights") or {}) if len(groups) == 1 else {}
    if qconf.get("format") != "pack-quantized" or w.get("type") != "int" or not w.get("symmetric", False) \
            or w.get("num_bits") not in (4, 8) or w.get("strategy") not in ("group", "channel"):
        raise ZolmError("zolm reads compressed-tensors pack-quantized checkpoints with one symmetric INT4/INT8 "
                        "group- or channel-wise Linear scheme only")
    group = w.get("group_size") if w["strategy"] == "group" else None
    return {"weight": {"kind": "int", "bits": w["num_bits"], "group_size": group}, "embed_bits": None,
            "skip": list(qconf.get("ignore") or ["lm_head"])}


def load_ct(path: str | os.PathLike, device: torch.device | str | None = None):
    """The zolm INT model of a pack-quantized folder (its tokenizer is loaded by the caller)."""
    from accelerate import init_empty_weights
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qconf = config.quantization_config
    qconf = qconf if isinstance(qconf, dict) else qconf.to_dict()
    del config.quantization_config
    settings = dict(getattr(config, "zolm_quantization", None) or _settings_from_ct(qconf))
    if hasattr(config, "zolm_quantization"):
        del config.zolm_quantization
    tied = settings.pop("tied_head", None)
    state = load_file(str(path / "model.safetensors"))
    extra = load_file(str(path / EXTRA)) if (path / EXTRA).is_file() else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    qc = QuantConfig.from_dict(settings)
    emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    emb_weight = state.pop(f"{emb_name}.weight")
    model.get_input_embeddings().weight = torch.nn.Parameter(emb_weight, requires_grad=False)
    quantize_(model, qc, tied=tied, search=False)  # a skeleton: the file's codes and scales replace its own
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            shape = state.pop(f"{name}.weight_shape").tolist()
            codes = unpack_from_int32(state.pop(f"{name}.weight_packed"), mod.fmt.bits, torch.Size(shape))
            mod.qweight = float_to_codes(codes.float(), mod.fmt)
            mod.scale = state.pop(f"{name}.weight_scale").float().reshape(mod.scale.shape).contiguous()
            if f"{name}.sparsity_mask" in extra:
                mod.sparsity_mask = extra[f"{name}.sparsity_mask"]
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding) and f"{emb_name}.qweight" in extra:
        emb.qweight, emb.scale = extra[f"{emb_name}.qweight"], extra[f"{emb_name}.scale"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith((".qweight", ".scale", ".sparsity_mask"))
               and k != f"{emb_name}.weight" and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ZolmError(f"{path}: weights do not fit {type(model).__name__} (missing {missing[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    if config.tie_word_embeddings and not isinstance(emb, QuantEmbedding):
        model.tie_weights()
    if device is not None:
        model.to(device)
    return model.eval()
