"""Exports of a (pruned, quantized, fine-tuned) model: dense Hugging Face safetensors and GGUF.

* ``to_dense``: replace zolm's low-bit layers by float ones holding the dequantized weights, so the model saves
  with ``save_pretrained`` and loads in plain transformers (zeros of a pruned model stay exact zeros).
* ``export_gguf``: write a GGUF file (gguf package) with llama.cpp's "llama" architecture: llama.cpp tensor names,
  its Q/K row permutation for rotary embeddings, the hyper-parameters, and the tokenizer. Tensors are F32, F16 or
  Q8_0 (blocks of 32 with one fp16 scale; re-encoded from zolm's codes, so approximate); norms stay F32.
  Tokenizer metadata is copied verbatim from a reference GGUF whose vocabulary matches (by default the built-in
  SmolLM2 file), else built from the tokenizer's BPE vocabulary and merges.
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
GGUF_TYPES = ("f32", "f16", "q8_0")
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


def _tokenizer_fields(tokenizer, reference: Path | None) -> tuple[dict, str]:
    """GGUF tokenizer key/values: from a reference GGUF with the same vocabulary, else from the BPE files."""
    from gguf import GGUFReader

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    if reference is not None and reference.is_file():
        r = GGUFReader(str(reference))
        if "tokenizer.ggml.tokens" in r.fields and r.fields["tokenizer.ggml.tokens"].contents() == tokens:
            return {k: (f.contents(), f.types) for k, f in r.fields.items() if k.startswith("tokenizer.")}, "copied"
    import json

    from gguf import GGUFValueType as T

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise ZolmError("GGUF export needs a BPE tokenizer (or a reference GGUF with the same vocabulary)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    special = set(tokenizer.all_special_ids)
    fields = {"tokenizer.ggml.model": ("gpt2", [T.STRING]), "tokenizer.ggml.pre": ("default", [T.STRING]),
              "tokenizer.ggml.tokens": (tokens, [T.ARRAY, T.STRING]),
              "tokenizer.ggml.token_type": ([3 if i in special else 1 for i in range(len(tokens))],
                                            [T.ARRAY, T.INT32]),
              "tokenizer.ggml.merges": (merges, [T.ARRAY, T.STRING])}
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("padding", tokenizer.pad_token_id), ("unknown", tokenizer.unk_token_id)):
        if tid is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = (int(tid), [T.UINT32])
    return fields, "built"


def _default_reference() -> Path | None:
    try:
        from zolm.models import builtin_gguf_path

        return builtin_gguf_path("smollm2-135m")
    except ZolmError:
        return None


def export_gguf(model, tokenizer, path: str | os.PathLike, tensor_type: str = "f32",
                reference: str | os.PathLike | None = None) -> dict:
    """Write ``model`` (Llama family; low-bit layers are dequantized first) as a GGUF file, atomically."""
    import gguf

    if tensor_type not in GGUF_TYPES:
        raise unknown("GGUF tensor type", tensor_type, GGUF_TYPES)
    cfg = model.config
    if cfg.model_type not in LLAMA_LIKE:
        raise ZolmError(f"GGUF export supports the Llama family ({', '.join(LLAMA_LIKE)}), not {cfg.model_type!r}")
    if getattr(cfg, "zolm_quantization", None) is not None:
        import copy

        model = to_dense(copy.deepcopy(model))
    path = Path(path)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[tensor_type]
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(str(getattr(cfg, "name_or_path", "") or "zolm export"))
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
        w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[tensor_type])
        fields, how = _tokenizer_fields(tokenizer, Path(reference) if reference else _default_reference())
        for key, (value, types) in fields.items():
            w.add_key_value(key, value, types[0], types[1] if len(types) > 1 else None)
        count = 0
        for name, p in model.state_dict().items():
            target = gguf_name(name)
            if target is None or (name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False)):
                continue
            arr = p.detach().float().cpu().numpy()
            if name.endswith("self_attn.q_proj.weight"):
                arr = _permute_rotary(arr, n_head)
            elif name.endswith("self_attn.k_proj.weight"):
                arr = _permute_rotary(arr, n_kv)
            if arr.ndim == 1 or tensor_type == "f32":
                w.add_tensor(target, arr.astype(np.float32))
            elif tensor_type == "f16":
                w.add_tensor(target, arr.astype(np.float16))
            else:
                w.add_tensor(target, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)  # uint8 byte rows
            count += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %s: %d tensors (%s), tokenizer %s", path, count, tensor_type, how)
    return {"path": str(path), "tensors": count, "tensor_type": tensor_type, "tokenizer": how,
            "bytes": path.stat().st_size}
