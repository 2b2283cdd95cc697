"""Tiny random decoder-only models of several families, built from configs (fresh per call, seeded)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 96


def tiny_model(kind: str, layers: int = 2, hidden: int = 32, seed: int = 0):
    """A tiny random causal LM of family ``kind`` (llama, qwen2, mistral, opt, gpt2) in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind in ("llama", "qwen2", "mistral"):
        cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                              "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                              "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
        cfg = cfg_cls(hidden_size=hidden, intermediate_size=2 * hidden, num_key_value_heads=2,
                      tie_word_embeddings=True, **common)
    elif kind == "opt":
        model_cls = tf.OPTForCausalLM
        cfg = tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, word_embed_proj_dim=hidden, dropout=0.0,
                           attention_dropout=0.0, **common)
    elif kind == "gpt2":
        model_cls = tf.GPT2LMHeadModel
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, vocab_size=VOCAB,
                            bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        raise ValueError(kind)
    return model_cls(cfg).eval()


def calib_ids(n: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama():
    return tiny_model("llama")
