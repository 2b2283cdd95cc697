"""Task evaluation (MeZO, papers.md section 3.4).

Classification and multiple choice: every candidate is scored by the mean log-probability of its option
tokens; the prediction is the argmax; the metric is accuracy. Generation (SQuAD): greedy decoding, at most
50 new tokens, stopped at the first newline; exact match and token F1 against the references.
Examples are batched by length (sorted, then restored) so padding stays small; scores do not depend on
the batching (left padding with explicit position ids, checked in tests).
"""

from __future__ import annotations

import torch

from zolm.data.encode import Encoded, candidate_batch, collate
from zolm.eval.metrics import exact_match, token_f1
from zolm.eval.scoring import candidate_logprobs, input_device, option_logprobs
from zolm.utils.dist import Reducer, shard, world_size
from zolm.utils.log import progress


@torch.no_grad()
def candidate_scores(model, items: list[Encoded], pad_id: int, batch_size: int = 16,
                     desc: str = "eval") -> list[list[float]]:
    """Mean option log-probability of every candidate of every example ([example][candidate])."""
    order = sorted(range(len(items)), key=lambda i: -max(len(s) for s in items[i].seqs))
    scores: list[list[float]] = [[] for _ in items]
    bar = progress(total=len(items), desc=desc, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        fast = candidate_batch([items[i] for i in idx], pad_id)
        if fast is not None:  # shared prefix, single-token candidates: one row per example
            for i, row in zip(idx, candidate_logprobs(model, fast).tolist()):
                scores[i] = row
            bar.update(len(idx))
            continue
        seqs = [s for i in idx for s in items[i].seqs]
        lens = [k for i in idx for k in items[i].option_lens]
        total, count = option_logprobs(model, collate(seqs, lens, pad_id))
        mean = (total / count.clamp(min=1)).tolist()
        pos = 0
        for i in idx:
            c = len(items[i].seqs)
            scores[i] = mean[pos:pos + c]
            pos += c
        bar.update(len(idx))
    bar.close()
    return scores


@torch.no_grad()
def generate_answers(model, tokenizer, items: list[Encoded], batch_size: int = 8,
                     max_new_tokens: int = 50) -> list[str]:
    """Greedy answers, cut at the first newline and stripped."""
    out: list[str] = [""] * len(items)
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt_ids))
    pad = tokenizer.pad_token_id
    bar = progress(total=len(items), desc="generate", leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        prompts = [items[i].prompt_ids for i in idx]
        batch = collate(prompts, [1] * len(prompts), pad)
        device = input_device(model)
        gen = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, stop_strings=["\n"], tokenizer=tokenizer)
        new = gen[:, batch["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            out[i] = text.split("\n")[0].strip()
        bar.update(len(idx))
    bar.close()
    return out


def evaluate_items(model, tokenizer, items: list[Encoded], kind: str, batch_size: int = 16,
                   desc: str = "eval") -> dict[str, float]:
    """Accuracy (classification, multiple choice) or EM/F1 (generation) of ``model`` on encoded examples.

    Under torchrun each worker evaluates its share of the examples and the counts are summed.
    """
    was_training = model.training
    model.eval()
    reduce = Reducer().sum
    mine = shard(items) if world_size() > 1 else items
    try:
        if kind == "generation":
            preds = generate_answers(model, tokenizer, mine, batch_size=max(1, batch_size // 2))
            f1, em, n = reduce([sum(token_f1(p, it.answers) for p, it in zip(preds, mine)),
                                sum(exact_match(p, it.answers) for p, it in zip(preds, mine)), len(mine)])
            return {"f1": f1 / max(1, n), "em": em / max(1, n), "n": int(n)}
        scores = candidate_scores(model, mine, tokenizer.pad_token_id, batch_size, desc)
        correct = sum(int(max(range(len(s)), key=s.__getitem__) == it.gold) for s, it in zip(scores, mine))
        correct, n = reduce([correct, len(mine)])
        return {"accuracy": correct / max(1, n), "n": int(n)}
    finally:
        model.train(was_training)
