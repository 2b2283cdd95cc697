"""Tokenisation and batching of prompt + candidate sequences (MeZO's ``encode_prompt``).

Each candidate becomes one token sequence ``tok(prompt + candidate)``; its option tokens are the last
``len(tok(prompt + candidate)) - len(tok(prompt))`` tokens. Computing the option length by this difference
(not by tokenising the candidate alone) handles BPE merges at the boundary. An example may give each candidate
its own prompt (``Example.prompts``: WinoGrande's partial scoring); the rule then applies per candidate.
Sequences longer than ``max_length`` are truncated on the left, keeping a leading BOS token if the tokenizer
adds one. Batches are left-padded so that every sequence's option tokens end at the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zolm.data.templates import Example
from zolm.errors import ZolmError


@dataclass
class Encoded:
    """Token ids of every candidate sequence of one example."""

    seqs: list[list[int]]
    option_lens: list[int]
    gold: int
    prompt_ids: list[int]
    answers: tuple[str, ...] = ()

    def shared_prefix(self) -> list[int] | None:
        """The common prefix if every candidate is one token after the same prefix, else None.

        Then one forward over the prefix scores every candidate (the logits at its last position), which
        halves the cost of two-way classification: SST-2, RTE, BoolQ, WSC, WiC and MultiRC verbalizers are
        single tokens for SmolLM2's tokenizer. Causal attention makes this exactly the same quantity.
        """
        if all(k == 1 for k in self.option_lens) and all(s[:-1] == self.seqs[0][:-1] for s in self.seqs):
            return self.seqs[0][:-1]
        return None


def _truncate(ids: list[int], max_length: int, bos: int | None) -> list[int]:
    if len(ids) <= max_length:
        return ids
    if bos is not None and ids and ids[0] == bos:
        return [bos] + ids[len(ids) - max_length + 1:]
    return ids[len(ids) - max_length:]


def encode_example(tokenizer, ex: Example, max_length: int = 1024) -> Encoded:
    """Tokenise one example's candidates; prompts are stripped of spaces at both ends, as in MeZO."""
    prompt = ex.prompt.strip(" ")
    prompt_ids = tokenizer(prompt)["input_ids"]
    bos = tokenizer.bos_token_id if prompt_ids and prompt_ids[0] == tokenizer.bos_token_id else None
    seqs, lens = [], []
    for i, cand in enumerate(ex.candidates):
        own = ex.prompt_for(i)  # per-candidate prompts (partial scoring) differ from ``prompt``
        own_ids = prompt_ids if own == ex.prompt else tokenizer(own.strip(" "))["input_ids"]
        ids = tokenizer((own + cand).strip(" "))["input_ids"]
        n_opt = len(ids) - len(own_ids)
        if n_opt <= 0:
            raise ZolmError(f"candidate {cand!r} adds no token to the prompt {own.strip(' ')[-40:]!r}")
        if n_opt >= max_length:
            raise ZolmError(f"candidate of {n_opt} tokens does not fit max_length={max_length}")
        seqs.append(_truncate(ids, max_length, bos))
        lens.append(n_opt)
    return Encoded(seqs, lens, ex.gold, _truncate(prompt_ids, max_length, bos), ex.answers)


def encode_all(tokenizer, examples: list[Example], max_length: int = 1024) -> list[Encoded]:
    return [encode_example(tokenizer, ex, max_length) for ex in examples]


def collate(seqs: list[list[int]], option_lens: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad sequences; returns input_ids, attention_mask, position_ids and option_mask ([B, L])."""
    length = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    option = torch.zeros((n, length), dtype=torch.bool)
    for i, (s, k) in enumerate(zip(seqs, option_lens)):
        input_ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        attention[i, length - len(s):] = 1
        option[i, length - k:] = True
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
            "option_mask": option}


def candidate_batch(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor] | None:
    """One row per example (the shared prefix) plus ``candidate_ids`` [B, C], or None if not applicable."""
    prefixes = [it.shared_prefix() for it in items]
    if any(p is None or not p for p in prefixes) or len({len(it.seqs) for it in items}) != 1:
        return None
    batch = collate(prefixes, [0] * len(items), pad_id)
    batch["candidate_ids"] = torch.tensor([[s[-1] for s in it.seqs] for it in items], dtype=torch.long)
    return batch


def training_batch(items: list[Encoded], kind: str, pad_id: int) -> dict[str, torch.Tensor]:
    """A training batch: every candidate for classification (CE over candidates), else the gold one only.

    Classification batches carry ``labels`` (gold index per example) and either ``candidate_ids`` (shared
    prefix, single-token candidates: one row per example) or ``num_candidates`` (one row per candidate).
    """
    if kind == "classification":
        c = len(items[0].seqs)
        if any(len(it.seqs) != c for it in items):
            raise ZolmError("all examples of a classification batch need the same number of candidates")
        fast = candidate_batch(items, pad_id)
        if fast is not None:
            fast["labels"] = torch.tensor([it.gold for it in items], dtype=torch.long)
            return fast
        seqs = [s for it in items for s in it.seqs]
        lens = [k for it in items for k in it.option_lens]
        batch = collate(seqs, lens, pad_id)
        batch["labels"] = torch.tensor([it.gold for it in items], dtype=torch.long)
        batch["num_candidates"] = torch.tensor(c)
        return batch
    return collate([it.seqs[it.gold] for it in items], [it.option_lens[it.gold] for it in items], pad_id)
