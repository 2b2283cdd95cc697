"""Rebuild ZO-fine-tuned weights from the base model and the replay log (MeZO, Sec. 2.1 "storage").

The log's first line describes the run (model, dtype, trainable-parameter selection, eps, sampler, seed,
queries, weight decay); each further line holds one step's seeds, projected gradients and learning rate.
Replaying performs exactly the operations training performed on the weights (+eps z, -2 eps z, the fused
restore-and-update, weight decay), in the same order and dtype, so the result is bit-identical to the
trained weights on the same torch build; no forward pass is needed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from zolm import models
from zolm.errors import ZolmError
from zolm.utils.io import read_jsonl
from zolm.utils.log import progress
from zolm.zo.optimizer import ZOConfig, ZOOptimizer
from zolm.zo.spsa import ParamSet

FORMAT = "zolm-replay-v1"


def replay_header(model: str, dtype: str, train_params: list[str], freeze_params: list[str],
                  opt_header: dict) -> dict:
    """First line of a replay log: what to rebuild the run from (parameter names hashed, to stay small)."""
    header = dict(opt_header)
    names = header.pop("param_names")
    header.pop("decay", None)
    return {"format": FORMAT, "model": model, "dtype": dtype, "train_params": train_params,
            "freeze_params": freeze_params, "num_params": len(names),
            "params_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(), **header}


def read_log(path: str | Path) -> tuple[dict, list[dict], int | None]:
    """(header, step records, selected step or None) of a replay log."""
    rows = read_jsonl(path)
    if not rows or rows[0].get("format") != FORMAT:
        raise ZolmError(f"{path} is not a zolm replay log (first line lacks format={FORMAT!r})")
    header, records, selected = rows[0], [], None
    for r in rows[1:]:
        if r.get("event") == "end":
            selected = r.get("selected_step")
        elif "step" in r:
            records.append(r)
    return header, records, selected


def replay(log_path: str | Path, base_model: str | None = None, upto_step: int | None = None):
    """Return ``(model, tokenizer, step)``: the base model with the logged ZO steps re-applied.

    Args:
        log_path: a ``replay.jsonl`` written by ``zolm finetune``.
        base_model: the model the run started from (default: the one named in the log).
        upto_step: replay steps 1..upto_step (default: the step the run selected, i.e. best on dev).
    """
    header, records, selected = read_log(log_path)
    target = upto_step if upto_step is not None else (selected or (records[-1]["step"] if records else 0))
    if records and target > records[-1]["step"]:
        raise ZolmError(f"the log ends at step {records[-1]['step']}; cannot replay to step {target}")
    model, tok = models.load(base_model or header["model"], header["dtype"])
    for p in model.parameters():
        p.requires_grad_(False)
    params = ParamSet(model, include=header["train_params"] or [".*"], exclude=header["freeze_params"])
    digest = hashlib.sha256("\n".join(params.names).encode()).hexdigest()
    if digest != header["params_sha256"]:
        raise ZolmError(f"the base model's trainable parameters ({len(params)}) differ from the logged run's "
                        f"({header['num_params']}): wrong base model?")
    cfg = ZOConfig(eps=header["eps"], queries=header["queries"], weight_decay=header["weight_decay"],
                   sampler=header["sampler"], seed=header["seed"])
    opt = ZOOptimizer(params, cfg)
    for rec in progress([r for r in records if r["step"] <= target], desc="replay"):
        opt.replay_(rec)
    return model, tok, target
