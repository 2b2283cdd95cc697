"""Exports of a (pruned, quantized, fine-tuned) model: dense Hugging Face safetensors and GGUF.

* ``to_dense``: replace zolm's low-bit layers by float ones holding the dequantized weights, so the model saves
  with ``save_pretrained`` and loads in plain transformers (zeros of a pruned model stay exact zeros).
* ``export_gguf``: write a GGUF file (gguf package, GGUF v3) with llama.cpp's "llama" architecture: llama.cpp
  tensor names, its Q/K row permutation for rotary embeddings, the hyper-parameters and metadata keys that
  llama.cpp's ``convert_hf_to_gguf.py`` writes (``general.file_type``, ``general.quantization_version``,
  ``llama.attention.key_length`` / ``value_length``, ...), and the tokenizer (zolm.gguf_tokenizer). Tensors are
  F32, F16, Q8_0 or Q4_0; norms and biases stay F32.

  Q4_0 / Q8_0 of zolm's INT layers copy the codes and scales into ggml blocks (zolm.quant.ggml): exact, bit for
  bit, when the scales are float16 values (``QuantFormat.fp16_scales``, the default for groups of 32) and the
  groups are multiples of 32 columns. INT4 layers go to Q4_0 (q4_0) or Q8_0 (q8_0); INT8 layers, including the
  embedding, to Q8_0 in both. A low-bit layer that cannot be copied exactly (float32 scales, e.g. per-channel
  INT8 quantized without ``--fp16-scales on``; FP8; groups of 16) is refused with a one-line error unless
  ``requantize=True``, which rounds its dequantized weights again with gguf's quantizer. Float tensors are
  quantized by gguf's reference quantizer (their first rounding).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zolm.errors import ZolmError, unknown

log = logging.getLogger(__name__)
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama.cpp LlamaFileType (general.file_type)
LLAMA_LIKE = ("llama", "mistral")
_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@torch.no_grad()
def to_dense(model) -> nn.Module:
    """In place: QuantLinear -> nn.Linear, QuantEmbedding -> nn.Embedding (a tied head re-tied); returns model."""
    from zolm.quant.linear import QuantEmbedding, QuantLinear, QuantTiedHead

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantize()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        dense = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        dense.weight.data = emb.weight
        model.set_input_embeddings(dense)
        if isinstance(model.get_output_embeddings(), QuantTiedHead):
            head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
            head.weight = dense.weight
            model.set_output_embeddings(head)
    if getattr(model.config, "zolm_quantization", None) is not None:
        del model.config.zolm_quantization
    return model


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Q and K (interleaved rotary pairs) from Hugging Face's (rotate_half halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp tensor name of a Hugging Face Llama parameter (None: not exported, e.g. a tied head)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        key = ".".join(parts[3:-1])
        if key in _BLOCK:
            return f"blk.{parts[2]}.{_BLOCK[key]}.{parts[-1]}"
    return None


def _default_reference() -> Path | None:
    try:
        from zolm.models import builtin_gguf_path

        return builtin_gguf_path("smollm2-135m")
    except ZolmError:
        return None


def _sources(model) -> list[tuple[str, object]]:
    """(Hugging Face parameter name, float tensor or zolm low-bit module) of every weight, embedding first."""
    from zolm.quant.linear import QuantEmbedding, QuantLinear

    out: list[tuple[str, object]] = []
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        out.append(("model.embed_tokens.weight", emb))
    out += [(f"{n}.weight", m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    out += [(n, p) for n, p in model.named_parameters()]
    return out


def _encode(src, tensor_type: str, name: str, requantize: bool, order: np.ndarray | None):
    """(array, raw ggml type or None, how) of one 2-D weight: exact copy, float conversion or quantization."""
    import gguf

    from zolm.quant.ggml import check_scales, encode_blocks, fits, permute_rows

    qtypes = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if isinstance(src, torch.Tensor) or tensor_type in ("f32", "f16"):
        arr = _as_array(src)
        if order is not None:
            arr = arr[order]
        if tensor_type == "f32":
            return arr.astype(np.float32), None, "float"
        if tensor_type == "f16":
            return arr.astype(np.float16), None, "float"
        return gguf.quants.quantize(arr, qtypes[tensor_type]), qtypes[tensor_type], "quantized"
    fmt = src.fmt
    target = "q4_0" if tensor_type == "q4_0" and fmt.kind == "int" and fmt.bits == 4 else "q8_0"
    codes, scale = src.qweight, src.scale
    if order is not None:
        codes, scale = permute_rows(codes, scale, order)
    cols = codes.shape[1] * (2 if fmt.kind == "int" and fmt.bits == 4 else 1)
    why = fits(fmt, cols, target) or check_scales(scale)
    if why is None:
        return encode_blocks(codes, scale, fmt, target), qtypes[target], "exact"
    if not requantize:
        raise ZolmError(f"{name} ({fmt.name}) cannot be copied into {target.upper()} exactly: {why}; quantize with "
                        f"fp16 scales in groups of 32 (zolm quantize --group-size 32 --fp16-scales on) or export "
                        f"with --requantize (a second rounding)")
    arr = _as_array(src)
    arr = arr[order] if order is not None else arr
    return gguf.quants.quantize(arr, qtypes[target]), qtypes[target], "requantized"


def export_gguf(model, tokenizer, path: str | os.PathLike, tensor_type: str = "f32",
                reference: str | os.PathLike | None = None, requantize: bool = False,
                pre: str | None = None) -> dict:
    """Write ``model`` (Llama family) as a GGUF file, atomically (see the module docstring for the types).

    Args:
        tensor_type: f32, f16, q8_0 or q4_0 (the file type; 1-D tensors stay F32).
        reference: a GGUF whose tokenizer metadata is copied when its vocabulary matches (default: built-in).
        requantize: round low-bit layers that do not map exactly again instead of refusing them.
        pre: ``tokenizer.ggml.pre`` to write (default: recognised from the tokenizer, zolm.gguf_tokenizer).

    Returns the path, tensor count, byte size and how many tensors were copied exactly / converted.
    """
    import gguf

    from zolm.gguf_tokenizer import tokenizer_fields
    from zolm.quant.linear import QuantTiedHead

    if tensor_type not in GGUF_TYPES:
        raise unknown("GGUF tensor type", tensor_type, GGUF_TYPES)
    cfg = model.config
    if cfg.model_type not in LLAMA_LIKE:
        raise ZolmError(f"GGUF export supports the Llama family ({', '.join(LLAMA_LIKE)}), not {cfg.model_type!r}")
    path = Path(path)
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) or isinstance(model.get_output_embeddings(), QuantTiedHead)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    counts: dict[str, int] = {}
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_type("model")
        w.add_name(str(getattr(cfg, "name_or_path", "") or "zolm export"))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(head_dim)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        w.add_file_type(int(FILE_TYPES[tensor_type]))
        fields, how = tokenizer_fields(tokenizer, Path(reference) if reference else _default_reference(), pre)
        for key, (value, types) in fields.items():
            w.add_key_value(key, value, types[0], types[1] if len(types) > 1 else None)
        for name, src in _sources(model):
            target = gguf_name(name)
            if target is None or (name == "lm_head.weight" and tied):
                continue
            order = None
            if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                heads = n_head if "q_proj" in name else n_kv
                rows = src.shape[0] if isinstance(src, torch.Tensor) else src.out_features
                order = _permute_rotary(np.arange(rows), heads)
            if isinstance(src, torch.Tensor) and src.dim() == 1:
                arr, raw, kind = _as_array(src).astype(np.float32), None, "float"
            else:
                arr, raw, kind = _encode(src, tensor_type, name, requantize, order)
            w.add_tensor(target, arr, raw_dtype=raw)
            counts[kind] = counts.get(kind, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %s: %s (%s), tokenizer %s", path, counts, tensor_type, how)
    return {"path": str(path), "tensors": sum(counts.values()), "tensor_type": tensor_type, "tokenizer": how,
            "bytes": path.stat().st_size, "encodings": counts}


def gguf_weights(model) -> dict[str, np.ndarray]:
    """GGUF tensor name -> the float32 weight zolm computes with, Q/K rows permuted as llama.cpp stores them:
    what each tensor of an exact export must dequantize to (tests and benchmarks/gguf_export.py check it)."""
    cfg = model.config
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    out: dict[str, np.ndarray] = {}
    for name, src in _sources(model):
        target = gguf_name(name)
        if target is None or target in out or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        arr = _as_array(src)
        if name.endswith("q_proj.weight"):
            arr = _permute_rotary(arr, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = _permute_rotary(arr, n_kv)
        out[target] = arr
    return out


def _as_array(src) -> np.ndarray:
    """float32 numpy array of a float tensor or of a zolm low-bit module's dequantized weight."""
    if isinstance(src, torch.Tensor):
        return src.detach().float().cpu().numpy()
    return src.weight.detach().cpu().numpy() if not hasattr(src, "dequantize") else src.dequantize().cpu().numpy()
