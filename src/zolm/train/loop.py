"""The one training loop of zolm (ZO and first-order alike, one task or a mixture of tasks).

A run directory holds:
    run_config.json   the resolved FinetuneConfig           metrics.jsonl  one JSON line per step / eval
    replay.jsonl      ZO replay log (grads, lr, hashes)       loss.png       loss curve (+ dev metric)
    checkpoint/       latest state, for resuming              best/          best-on-dev trainable weights
    model/            final model (save_pretrained)           adapter/       LoRA adapter (fo-lora)
    results.json      metrics before / after, timings
Data order and ZO seeds are pure functions of (seed, step), so resuming from ``checkpoint/`` replays exactly
what an uninterrupted run does: the final weights are bit-identical (tested).

Under ``torchrun`` every worker runs this loop on its contiguous share of each global batch (split further into
``grad_accum`` micro-batches); ZO workers sum two scalars per task and query, first-order workers sum
gradients, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from zolm import models
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.errors import ZolmError
from zolm.eval.evaluate import evaluate_items
from zolm.train.batches import Mixture
from zolm.train.build import build_method
from zolm.train.checkpoint import copy_into, load_checkpoint, nonfinite, save_checkpoint
from zolm.train.config import FinetuneConfig
from zolm.train.methods import StepBatch
from zolm.train.plot import plot_loss
from zolm.train.rundir import prepare_run_dir
from zolm.utils import dist
from zolm.utils.devices import resolve_device, use_device
from zolm.utils.io import JsonlWriter, atomic_write_json, read_jsonl
from zolm.utils.log import progress
from zolm.zo.optimizer import DivergenceError
from zolm.zo.replay import ReplayWriter, replay_header, tensors_digest

log = logging.getLogger(__name__)


def lr_at(config: FinetuneConfig, step: int) -> float:
    o = config.optim
    if o.lr_schedule == "linear":
        return o.lr * (1.0 - (step - 1) / config.steps)
    return o.lr


def _prepare_out(config: FinetuneConfig, overwrite: bool, stack: contextlib.ExitStack) -> dict | None:
    """Lock the run directory (released when ``stack`` closes); return the checkpoint state to resume from."""
    lock, state = prepare_run_dir(config.out, config.to_dict(), overwrite, [config.model, config.data_dir])
    stack.callback(lock.release)
    return state


class _Quiet:
    """Stands in for a log writer on workers other than rank 0."""

    def write(self, record: dict) -> None:
        pass

    def step(self, record: dict) -> None:
        pass

    def checkpoint(self, step: int, digest: str) -> None:
        pass

    def end(self, step: int, digest: str) -> None:
        pass

    def close(self) -> None:
        pass


def local_parts(idx: list[int], grad_accum: int) -> list[list[int]]:
    """This worker's share of a global batch, cut into ``grad_accum`` micro-batches."""
    mine = dist.shard(idx)
    return [p for p in (dist.shard(mine, r, grad_accum) for r in range(grad_accum)) if p]


def _metric(result: dict) -> float:
    """The number best-on-dev selection maximises: accuracy, F1, or the average over a task mixture."""
    return result.get("average", result.get("accuracy", result.get("f1", float("nan"))))


def _flat(prefix: str, result: dict) -> dict:
    """{'dev_accuracy': ...} for one task, {'dev_sst2_accuracy': ..., 'dev_average': ...} for a mixture."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out.update({f"{prefix}_{k}_{m}": x for m, x in v.items()})
        else:
            out[f"{prefix}_{k}"] = v
    return out


def placement(config: FinetuneConfig) -> torch.device:
    """This worker's device, checked before any work: ``cuda`` is ``cuda:LOCAL_RANK`` under torchrun (made the
    current device); a device_map shards one model per process, which torchrun's data parallelism cannot share."""
    if config.device_map is not None and dist.world_size() > 1:
        raise ZolmError("device_map shards one model over the GPUs and cannot be combined with torchrun workers; "
                        "use --device cuda (one GPU per worker) or a single process with --device-map")
    device = resolve_device(config.device)
    use_device(device)
    return device


def finetune(config: FinetuneConfig, overwrite: bool = False,
             callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
    """Fine-tune ``config.model`` on ``config.task`` (one task or a comma-separated mixture).

    Returns the results dict. ``callbacks`` are called as ``cb(step, record)`` after every step (tests use
    one to interrupt a run). The run directory is locked while it runs (zolm.train.rundir).
    """
    with contextlib.ExitStack() as stack:
        return _finetune(config, overwrite, callbacks, stack)


def _finetune(config: FinetuneConfig, overwrite: bool, callbacks: Sequence[Callable[[int, dict], None]],
              stack: contextlib.ExitStack) -> dict:
    device = placement(config)
    distributed = dist.init(device)
    main = dist.is_main()
    if config.batch_size < dist.world_size() * config.grad_accum:
        raise ZolmError(f"batch_size {config.batch_size} is smaller than workers x grad_accum "
                        f"({dist.world_size()} x {config.grad_accum})")
    names = config.tasks
    all_splits = [load_splits(t, config.data_dir, config.num_train, config.num_dev, config.num_test,
                              config.data_seed) for t in names]  # bad data fails here, before the model loads
    for name, s in zip(names, all_splits):
        if not s.train:
            raise ZolmError(f"task {name} has no training examples with these settings")
    resume = _prepare_out(config, overwrite, stack) if main else None
    dist.barrier()
    out = Path(config.out)
    if not main and (out / "checkpoint" / "state.json").is_file():
        resume = json.loads((out / "checkpoint" / "state.json").read_text())
    if main:
        atomic_write_json(out / "run_config.json", config.to_dict())
    model, tok = models.load(config.model, config.dtype, device=device, device_map=config.device_map)
    kinds = [s.task.kind for s in all_splits]
    train = [encode_all(tok, s.train, config.max_length) for s in all_splits]
    dev = [encode_all(tok, s.dev, config.max_length) for s in all_splits]
    test = [encode_all(tok, s.test, config.max_length) for s in all_splits]
    mixture = Mixture([len(t) for t in train], config.batch_size, config.seed, config.task_weights or None)
    method = build_method(model, config, run_dir=out)
    trainable = method.trainable
    state = {"step": 0, "best_step": None, "best_dev": None, "before": None, "forward_passes": 0,
             "train_time_s": 0.0, "config": config.to_dict()}
    if resume is not None:
        weights, state = load_checkpoint(out / "checkpoint", method.torch_optimizer)
        copy_into(trainable, weights)
        log.info("resuming %s from step %d", out, state["step"])
    start = state["step"]
    metrics = JsonlWriter(out / "metrics.jsonl", truncate_after=start if resume else None) if main else _Quiet()
    replay = None
    if method.is_zo:
        header = None if resume else replay_header(config.to_dict(), method.optimizer.header(),
                                                   tensors_digest(method.model.state_dict()) if main else None)
        replay = ReplayWriter(out / "replay.jsonl", header, start if resume else None,
                              method.optimizer.seeds_for) if main else _Quiet()
    pad = tok.pad_token_id

    def evaluate(split: list, desc: str) -> dict:
        results = {n: evaluate_items(method.model, tok, items, k, config.eval_batch_size, f"{desc} {n}")
                   for n, items, k in zip(names, split, kinds) if items}
        if len(names) == 1:
            return next(iter(results.values()), {})
        results["average"] = sum(_metric(r) for r in results.values()) / max(1, len(results))
        return results

    if config.eval_before and state["before"] is None and any(test):
        state["before"] = evaluate(test, "test (before)")
        metrics.write({"step": 0, **_flat("test", state["before"])})

    title = f"{config.method} on {config.task}"
    bar = progress(range(start + 1, config.steps + 1), desc=f"{config.method} {config.task}",
                   initial=start, total=config.steps, disable=not main)
    try:
        for step in bar:
            per_task, epoch = mixture.step(step)
            batch = StepBatch(
                parts=[(t, training_batch([train[t][i] for i in p], kinds[t], pad))
                       for t, idx in enumerate(per_task) for p in local_parts(idx, config.grad_accum)],
                kinds=kinds, weights=[len(idx) / config.batch_size for idx in per_task])
            lr = lr_at(config, step)
            t0 = time.perf_counter()
            result = method.step(batch, step, lr, epoch)
            state["train_time_s"] += time.perf_counter() - t0
            loss = result.loss if method.is_zo else result
            state["forward_passes"] += method.forwards_per_step * sum(len(i) for i in per_task)
            record = {"step": step, "loss": loss, "lr": lr, "epoch": epoch, "forward_passes": state["forward_passes"]}
            if method.is_zo:
                record["queries"] = len(result.seeds)  # SPSA queries this step (varies under AdaZeta's schedule)
            if len(names) > 1:
                record["task_loss"] = dict(zip(names, method.last_task_losses))
            metrics.write(record)
            if replay is not None:
                replay.step(result.to_json())
            bar.set_postfix(loss=f"{loss:.4f}")
            for cb in callbacks:
                cb(step, record)
            if any(dev) and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
                res = evaluate(dev, f"dev @{step}")
                metrics.write({"step": step, **_flat("dev", res)})
                if state["best_dev"] is None or _metric(res) > _metric(state["best_dev"]):
                    state["best_dev"], state["best_step"] = res, step
                    if main:
                        save_checkpoint(out / "best", trainable, {"step": step, "dev": res})
                if main:
                    plot_loss(read_jsonl(out / "metrics.jsonl"), out / "loss.png", title)
            state["step"] = step
            if main and ((config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps):
                if replay is not None and not nonfinite(trainable):
                    replay.checkpoint(step, tensors_digest(trainable))  # before the write: a kill drops both
                save_checkpoint(out / "checkpoint", trainable, state, method.torch_optimizer)
    except DivergenceError as e:
        metrics.write({"step": state["step"] + 1, "event": "diverged", "message": str(e)})
        if main:
            atomic_write_json(out / "results.json",
                              {"status": "diverged", "message": str(e), **_summary(config, state)})
        where = (f"last good checkpoint: {out / 'checkpoint'} (step {_ckpt_step(out)})"
                 if (out / "checkpoint").exists() else "no checkpoint was written yet")
        raise ZolmError(f"training diverged: {e}; stopped, {where} (resuming repeats the same steps: lower --lr "
                        "and use --overwrite or another --out)") from None
    finally:
        bar.close()
        metrics.close()
    dist.barrier()  # rank 0 has written best/ before anyone reads it
    if state["best_step"] is not None and state["best_step"] != config.steps:
        weights, _ = load_checkpoint(out / "best")
        copy_into(trainable, weights)
    selected = state["best_step"] or config.steps
    after = evaluate(test, "test (after)") if any(test) else {}
    if replay is not None:
        replay.end(selected, tensors_digest(trainable) if main else "")
        replay.close()
    results = {"status": "done", **_summary(config, state), "selected_step": selected, "after": after}
    if distributed:
        steps_here = max(1, state["step"] - start)
        results.update(workers=dist.world_size(), bytes_sent_per_step=method.reducer.bytes_sent / steps_here)
    if main:
        method.save(out, tok)
        atomic_write_json(out / "results.json", results)
        plot_loss(read_jsonl(out / "metrics.jsonl"), out / "loss.png", title)
    dist.barrier()
    return results


def _ckpt_step(out: Path) -> int:
    return json.loads((out / "checkpoint" / "state.json").read_text())["step"]


def _summary(config: FinetuneConfig, state: dict) -> dict:
    return {"task": config.task, "method": config.method, "model": config.model, "steps": state["step"],
            "before": state["before"], "best_dev": state["best_dev"], "best_step": state["best_step"],
            "forward_passes": state["forward_passes"], "train_time_s": round(state["train_time_s"], 2)}
