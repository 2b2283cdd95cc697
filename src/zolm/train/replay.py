"""Rebuild ZO-fine-tuned weights from the base model and the replay log, without any forward pass, and verify them.

The log header holds the run's FinetuneConfig, so the method is rebuilt exactly as training built it
(parameter selection, and whatever the method adds: adapters, masks, a quantized model). Replaying then
performs the operations training performed on the weights (+eps z, -2 eps z, the fused restore-and-update,
weight decay), in the same order and dtype: the result is bit-identical to the trained weights on the same
torch build. The log's chain is checked before anything loads (zolm.zo.replay.read_log), the base model against
the fingerprint in the header before any step is applied, and the rebuilt weights against the hash recorded at
the target step (the end or a checkpoint) when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zolm import models
from zolm.errors import ZolmError
from zolm.train.build import build_method
from zolm.train.config import FinetuneConfig
from zolm.utils.devices import resolve_device
from zolm.utils.log import progress
from zolm.zo.replay import names_digest, read_log, tensors_digest, with_seeds


@dataclass
class Replayed:
    """What :func:`replay_verified` rebuilt: the method (its model carries the weights), tokenizer, step, and
    whether the weights matched a recorded hash (None: no hash recorded for that step, or a v1 log)."""

    method: object
    tokenizer: object
    step: int
    verified: bool | None


def replay_verified(log_path: str | Path, base_model: str | None = None, upto_step: int | None = None) -> Replayed:
    """Replay ``log_path`` onto ``base_model`` (default: the model named in the log) up to ``upto_step`` (default:
    the step the run selected, i.e. best on dev); refuses a broken log, a wrong base, a step outside the log and
    weights that do not match the hash recorded for the step."""
    log = read_log(log_path)
    header = log.header
    missing = [k for k in ("config", "params_sha256") if k not in header]
    if missing:
        raise ZolmError(f"{log_path} was written by an older zolm (its header lacks {', '.join(missing)}); "
                        "this version cannot replay it")
    last = log.last_step
    target = upto_step if upto_step is not None else (log.selected if log.selected is not None else last)
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target <= last or (
            upto_step is not None and target < 1):
        raise ZolmError(f"cannot replay to step {target}: the log holds steps 1..{last}")
    config = FinetuneConfig.from_dict({**header["config"], "out": ""})
    if base_model is not None:
        config.model = base_model
    device = None if config.device_map is not None else resolve_device(config.device, distributed=False)
    model, tok = models.load(config.model, config.dtype, device=device, device_map=config.device_map)
    method = build_method(model, config, run_dir=Path(log_path).parent)
    if names_digest(method.params.names) != header["params_sha256"]:
        raise ZolmError(f"the base model's trainable parameters ({len(method.params)}) differ from the logged "
                        f"run's ({header['num_params']}): wrong base model?")
    if header.get("base_sha256") and tensors_digest(method.model.state_dict()) != header["base_sha256"]:
        raise ZolmError(f"the base model {config.model} is not the one the run started from (its weights differ "
                        "from the fingerprint in the log); refusing to replay")
    opt = method.optimizer
    for rec in progress(log.records[:target], desc="replay"):
        opt.replay_(with_seeds(rec, opt.seeds_for))
    verified = None
    if log.verifiable and target in log.hashes:
        if tensors_digest(method.trainable) != log.hashes[target]:
            raise ZolmError(f"the rebuilt weights at step {target} do not match the hash recorded in {log_path} "
                            "(another torch build, or a tampered log)")
        verified = True
    return Replayed(method, tok, target, verified)


def replay(log_path: str | Path, base_model: str | None = None, upto_step: int | None = None):
    """Return ``(method, tokenizer, step)``: the method's model carries the replayed weights (see
    :func:`replay_verified`, which also says whether they matched the recorded hash).

    Args:
        log_path: a ``replay.jsonl`` written by ``zolm finetune`` (method artefacts, e.g. masks, are read
            from the same directory).
        base_model: the model the run started from (default: the one named in the log).
        upto_step: replay steps 1..upto_step (default: the step the run selected, i.e. best on dev).

    ``method.model`` is the model; ``method.save_model(dir, tokenizer)`` writes it as training would.
    """
    r = replay_verified(log_path, base_model, upto_step)
    return r.method, r.tokenizer, r.step
