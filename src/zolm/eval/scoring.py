"""Option-token log-likelihoods and the prompt-based training losses (MeZO, papers.md section 3.3).

Only the logits that predict option tokens are computed (``logits_to_keep``): with left padding the option
tokens of every row end at the last position, so the last ``max_option_len + 1`` positions suffice. For
SmolLM2 at 64 tokens this skips ~25% of a forward pass (the tied 49152 x 576 LM head).
"""

from __future__ import annotations

import inspect
import itertools
from functools import lru_cache

import torch
import torch.nn.functional as F

_LEN_KEYS = ("input_ids", "attention_mask", "position_ids")


@lru_cache(maxsize=64)
def _accepts(forward_cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(forward_cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _base_class(model) -> type:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base)


def input_device(model) -> torch.device:
    """Where the model's inputs go (the embedding's device; with a device_map, the first shard's)."""
    if hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        hook = getattr(emb, "_hf_hook", None)  # accelerate: the embedding runs there (its weights may be offloaded)
        if getattr(hook, "execution_device", None) is not None:
            d = hook.execution_device
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
        codes = getattr(emb, "qweight", None)  # a quantized embedding: its ``weight`` would dequantize the table
        return (codes if codes is not None else emb.weight).device
    return next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(0)).device


def last_logits(model, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Logits of the last ``k`` positions ([B, k, V]), computing only those where the model allows it."""
    cls = _base_class(model)
    device = input_device(model)
    kwargs = {key: batch[key].to(device) for key in _LEN_KEYS if key in batch}
    if not _accepts(cls, "position_ids"):
        kwargs.pop("position_ids", None)
    if _accepts(cls, "logits_to_keep"):
        kwargs["logits_to_keep"] = k
    return model(**kwargs, use_cache=False).logits[:, -k:]


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # fp64 stays


def option_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits over the positions that predict option tokens.

    Returns ``(logits [B, K, V], targets [B, K], mask [B, K])`` where ``K = max option length`` and row
    ``b``'s option tokens are the ``mask``-ed entries of ``targets``.
    """
    option_mask = batch["option_mask"]
    k = int(option_mask.sum(-1).max()) + 1
    logits = last_logits(model, batch, k)
    dev = logits.device
    return logits[:, :-1], batch["input_ids"][:, -(k - 1):].to(dev), option_mask[:, -(k - 1):].to(dev)


def candidate_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(candidate | shared prefix) for single-token candidates ([B, C]; batch from candidate_batch)."""
    logp = _log_softmax(last_logits(model, batch, 1)[:, -1])
    return logp.gather(-1, batch["candidate_ids"].to(logp.device))


def option_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(option token | prefix) and the number of option tokens."""
    logits, targets, mask = option_logits(model, batch)
    logp = _log_softmax(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    return logp.sum(-1), mask.sum(-1)


def loss_count(batch: dict[str, torch.Tensor], kind: str) -> int:
    """The denominator of the batch's loss (examples, or option tokens), known before any forward pass."""
    if kind == "classification":
        return int(batch["labels"].numel())
    return int(batch["option_mask"].sum())


def task_loss_sum(model, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The batch's loss *sum* (over examples for classification, over option tokens otherwise).

    Summing lets micro-batches and data-parallel workers combine exactly what one big batch would average:
    loss = sum over parts / :func:`loss_count` over parts.
    """
    if "candidate_ids" in batch:
        scores = candidate_logprobs(model, batch)
        return F.cross_entropy(scores, batch["labels"].to(scores.device), reduction="sum")
    total, count = option_logprobs(model, batch)
    if kind == "classification":
        c = int(batch["num_candidates"])
        scores = (total / count.clamp(min=1)).view(-1, c)
        return F.cross_entropy(scores, batch["labels"].to(scores.device), reduction="sum")
    return -total.sum()


def task_loss(model, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """MeZO's prompt-based loss.

    classification: cross-entropy over candidates of the length-normalised option log-likelihoods
        score_c = mean_t log p(option_t); loss = -log softmax_c(score)[gold], averaged over examples.
    multiple_choice / generation: teacher-forcing cross-entropy on the gold option tokens, averaged over
        all option tokens of the batch.
    """
    return task_loss_sum(model, batch, kind) / max(1, loss_count(batch, kind))
