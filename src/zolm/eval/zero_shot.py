"""Zero-shot multiple choice scored as lm-evaluation-harness scores it (``HFLM.loglikelihood``, ``ConfigurableTask.
process_results`` for ``output_type: multiple_choice``).

For each (context, continuation): trailing spaces of the context move to the front of the continuation; the
token ids are ``whole = encode(context + continuation)``, ``ctx = encode(context)``, ``cont = whole[len(ctx):]``
(no special tokens, as HFLM for causal models; an empty context becomes ``[prefix token]``), left-truncated
to ``max_length + 1`` tokens. The score is the sum of log p(cont_t | everything before it). Then

    acc      = [argmax_i ll_i == gold]
    acc_norm = [argmax_i ll_i / len(choice_i) == gold]     len() of lm-eval's ``doc_to_choice`` string (characters;
                                                            the same as bytes for ASCII text)

averaged over the documents. The requests come from :mod:`zolm.data.zero_shot`.
"""

from __future__ import annotations

import numpy as np
import torch

from zolm.data.encode import collate
from zolm.data.tasks import get_task, load_rows
from zolm.data.zero_shot import LM_EVAL, Request, request
from zolm.errors import ZolmError
from zolm.eval.scoring import option_logprobs
from zolm.utils.dist import Reducer, shard, world_size
from zolm.utils.log import progress


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's ``HFLM._encode_pair`` computes them."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16, max_length: int = 2048,
                   desc: str = "lm-eval") -> list[float]:
    """Sum log-likelihood of each continuation given its context (longest first in batches; order restored)."""
    seqs, lens = [], []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ZolmError(f"empty continuation after tokenisation for context {context[-40:]!r}")
        seqs.append((ctx + cont)[-(max_length + 1):])
        lens.append(min(len(cont), max_length))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(seqs)
    bar = progress(total=len(seqs), desc=desc, leave=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        total, _ = option_logprobs(model, collate([seqs[i] for i in idx], [lens[i] for i in idx], pad))
        for i, v in zip(idx, total.double().tolist()):
            out[i] = v
        bar.update(len(idx))
    bar.close()
    return out


def score(requests: list[Request], lls: list[float]) -> dict[str, float]:
    """acc / acc_norm sums over documents (lm-eval's process_results), from the flat list of loglikelihoods."""
    sums = {"acc": 0.0, "acc_norm": 0.0}
    pos = 0
    for r in requests:
        ll = np.array(lls[pos:pos + len(r.continuations)])
        pos += len(r.continuations)
        sums["acc"] += float(np.argmax(ll) == r.gold)
        sums["acc_norm"] += float(np.argmax(ll / np.array([float(len(c)) for c in r.choices])) == r.gold)
    return sums


def sample_rows(task: str, data_dir, num_test: int, seed: int = 0) -> list[dict]:
    """The same seeded test examples that ``load_splits(task, num_train=0, num_dev=0, num_test=...)`` picks."""
    spec = get_task(task)
    rows = load_rows(spec, spec.test_split, data_dir)
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:num_test]]


def evaluate_lm_eval(model, tokenizer, task: str, rows: list[dict], batch_size: int = 16,
                     max_length: int = 2048) -> dict[str, float]:
    """lm-eval's metrics of ``task`` (acc, and acc_norm where its YAML lists it) on ``rows``, plus ``n``.

    ``accuracy`` repeats ``acc`` (zolm's name, for averages). Under torchrun the documents are sharded.
    """
    if task not in LM_EVAL:
        raise ZolmError(f"no lm-eval template for {task!r}; lm-eval zero-shot tasks: {', '.join(LM_EVAL)}")
    reqs = [request(task, r) for r in rows]
    mine = shard(reqs) if world_size() > 1 else reqs
    was_training = model.training
    model.eval()
    try:
        pairs = [(c, t) for r in mine for c, t in zip(r.contexts, r.continuations)]
        sums = score(mine, loglikelihoods(model, tokenizer, pairs, batch_size, max_length, desc=task))
    finally:
        model.train(was_training)
    acc, acc_norm, n = Reducer().sum([sums["acc"], sums["acc_norm"], len(mine)])
    out = {"acc": acc / max(1, n)}
    if reqs and "acc_norm" in reqs[0].metrics:
        out["acc_norm"] = acc_norm / max(1, n)
    return {**out, "accuracy": out["acc"], "n": int(n), "protocol": "lm-eval"}
