"""Test helpers shared across modules."""

import torch
from torch import nn


class Quadratic(nn.Module):
    """f(theta) = 0.5 theta^T A theta with a fixed SPD matrix A."""

    def __init__(self, d: int = 100, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(d, d, generator=g, dtype=dtype) / d**0.5
        self.register_buffer("A", m @ m.T + 0.5 * torch.eye(d, dtype=dtype))
        self.theta = nn.Parameter(torch.randn(d, generator=g, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta

    @torch.no_grad()
    def value(self) -> float:
        return float(self())

    def grad(self) -> torch.Tensor:
        return self.A @ self.theta.detach()


def gradients_and_loss(model, batch, kind: str = "classification"):
    """(true gradients by backprop of the task loss on ``batch``, a no-grad loss closure): the estimator target."""
    from zolm.eval.scoring import task_loss

    for p in model.parameters():
        p.requires_grad_(True)
    task_loss(model, batch, kind).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def loss() -> float:
        with torch.inference_mode():
            return float(task_loss(model, batch, kind))

    return grads, loss


ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "phi3", "opt", "gpt2", "gpt_neox")


def tiny_arch(kind: str, vocab: int, seed: int = 0, positions: int = 256, layers: int = 2, hidden: int = 32):
    """A tiny random causal LM of any of ``ARCHITECTURES``, built from its config (offline, seeded, eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=positions, **ids)
    llama_like = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                  "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
                  "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM)}
    if kind in llama_like:
        cfg_cls, model_cls = llama_like[kind]
        extra = {"head_dim": hidden // 4} if kind == "gemma" else {}
        cfg = cfg_cls(intermediate_size=2 * hidden, num_key_value_heads=2, tie_word_embeddings=True, **extra,
                      **common)
    elif kind == "opt":
        model_cls = tf.OPTForCausalLM
        cfg = tf.OPTConfig(ffn_dim=2 * hidden, word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0,
                           **common)
    elif kind == "gpt2":
        model_cls = tf.GPT2LMHeadModel
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=positions, vocab_size=vocab,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    elif kind == "gpt_neox":
        model_cls = tf.GPTNeoXForCausalLM
        cfg = tf.GPTNeoXConfig(intermediate_size=2 * hidden, hidden_dropout=0.0, attention_dropout=0.0, **common)
    else:
        raise ValueError(kind)
    return model_cls(cfg).eval()
