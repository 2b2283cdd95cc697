"""Rebuild ZO-fine-tuned weights from the base model and the replay log, without any forward pass.

The log header holds the run's FinetuneConfig, so the method is rebuilt exactly as training built it
(parameter selection, and whatever the method adds: adapters, masks, a quantized model). Replaying then
performs the operations training performed on the weights (+eps z, -2 eps z, the fused restore-and-update,
weight decay), in the same order and dtype: the result is bit-identical to the trained weights on the same
torch build.
"""

from __future__ import annotations

from pathlib import Path

from zolm import models
from zolm.errors import ZolmError
from zolm.train.build import build_method
from zolm.train.config import FinetuneConfig
from zolm.utils.devices import resolve_device
from zolm.utils.log import progress
from zolm.zo.replay import names_digest, read_log


def replay(log_path: str | Path, base_model: str | None = None, upto_step: int | None = None):
    """Return ``(method, tokenizer, step)``: the method's model carries the replayed weights.

    Args:
        log_path: a ``replay.jsonl`` written by ``zolm finetune`` (method artefacts, e.g. masks, are read
            from the same directory).
        base_model: the model the run started from (default: the one named in the log).
        upto_step: replay steps 1..upto_step (default: the step the run selected, i.e. best on dev).

    ``method.model`` is the model; ``method.save_model(dir, tokenizer)`` writes it as training would.
    """
    header, records, selected = read_log(log_path)
    target = upto_step if upto_step is not None else (selected or (records[-1]["step"] if records else 0))
    if records and target > records[-1]["step"]:
        raise ZolmError(f"the log ends at step {records[-1]['step']}; cannot replay to step {target}")
    missing = [k for k in ("config", "params_sha256") if k not in header]
    if missing:
        raise ZolmError(f"{log_path} was written by an older zolm (its header lacks {', '.join(missing)}); "
                        "this version cannot replay it")
    config = FinetuneConfig.from_dict(header["config"])
    if base_model is not None:
        config.model = base_model
    device = None if config.device_map is not None else resolve_device(config.device, distributed=False)
    model, tok = models.load(config.model, config.dtype, device=device, device_map=config.device_map)
    method = build_method(model, config, run_dir=Path(log_path).parent)
    if names_digest(method.params.names) != header["params_sha256"]:
        raise ZolmError(f"the base model's trainable parameters ({len(method.params)}) differ from the logged "
                        f"run's ({header['num_params']}): wrong base model?")
    for rec in progress([r for r in records if r["step"] <= target], desc="replay"):
        method.optimizer.replay_(rec)
    return method, tok, target
