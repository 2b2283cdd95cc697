"""The one training loop of zolm (ZO and first-order alike).

A run directory holds:
    run_config.json   the resolved FinetuneConfig           metrics.jsonl  one JSON line per step / eval
    replay.jsonl      ZO replay log (seeds, grads, lr)        loss.png       loss curve (+ dev metric)
    checkpoint/       latest state, for resuming              best/          best-on-dev trainable weights
    model/            final model (save_pretrained)           adapter/       LoRA adapter (fo-lora)
    results.json      metrics before / after, timings
Data order and ZO seeds are pure functions of (seed, step), so resuming from ``checkpoint/`` replays exactly
what an uninterrupted run does: the final weights are bit-identical (tested).

Under ``torchrun`` every worker runs this loop on its contiguous share of each global batch (split further into
``grad_accum`` micro-batches); ZO workers sum two scalars per query, first-order workers sum gradients, and
only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from zolm import models
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.errors import ZolmError
from zolm.eval.evaluate import evaluate_items
from zolm.train.checkpoint import copy_into, load_checkpoint, save_checkpoint
from zolm.train.config import FinetuneConfig
from zolm.train.methods import build_method
from zolm.train.plot import plot_loss
from zolm.utils import dist
from zolm.utils.io import JsonlWriter, atomic_write_json, read_jsonl
from zolm.utils.log import progress
from zolm.zo.optimizer import DivergenceError
from zolm.zo.replay import replay_header
from zolm.zo.rng import derive_seed

log = logging.getLogger(__name__)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> tuple[list[int], int]:
    """Example indices of training step ``step`` (1-based) and its epoch: a pure function of its inputs.

    Each epoch is a fresh seeded permutation cut into ``n // batch_size`` full batches (the remainder is
    dropped); with fewer than ``batch_size`` examples every step uses all of them.
    """
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step - 1, per_epoch)
    perm = np.random.default_rng(derive_seed(seed, 0xDA7A, epoch) % (1 << 63)).permutation(n)
    return perm[pos * batch_size:(pos + 1) * batch_size].tolist(), epoch


def lr_at(config: FinetuneConfig, step: int) -> float:
    if config.lr_schedule == "linear":
        return config.lr * (1.0 - (step - 1) / config.steps)
    return config.lr


def _prepare_out(config: FinetuneConfig, overwrite: bool) -> dict | None:
    """Create the run directory; return the checkpoint state to resume from, if any."""
    out = Path(config.out)
    if not config.out:
        raise ZolmError("an output directory is required (--out)")
    if overwrite and out.exists():
        shutil.rmtree(out)
    ckpt = out / "checkpoint" / "state.json"
    if ckpt.is_file():
        state = json.loads(ckpt.read_text())
        if state["config"] != config.to_dict():
            diff = sorted(k for k in config.to_dict() if state["config"].get(k) != config.to_dict()[k])
            raise ZolmError(f"{out} holds a run with another config (differs in: {', '.join(diff)}); "
                            "use --overwrite or another --out")
        return state
    if out.exists() and any(out.iterdir()):
        raise ZolmError(f"{out} exists and is not empty; use --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    return None


class _Quiet:
    """Stands in for a log writer on workers other than rank 0."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def local_parts(idx: list[int], grad_accum: int) -> list[list[int]]:
    """This worker's share of a global batch, cut into ``grad_accum`` micro-batches."""
    mine = dist.shard(idx)
    return [p for p in (dist.shard(mine, r, grad_accum) for r in range(grad_accum)) if p]


def _metric(result: dict) -> float:
    return result.get("accuracy", result.get("f1", float("nan")))


def finetune(config: FinetuneConfig, overwrite: bool = False,
             callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.method``; returns the results dict.

    ``callbacks`` are called as ``cb(step, record)`` after every step (tests use one to interrupt a run).
    """
    distributed = dist.init(config.device)
    main = dist.is_main()
    if config.batch_size < dist.world_size() * config.grad_accum:
        raise ZolmError(f"batch_size {config.batch_size} is smaller than workers x grad_accum "
                        f"({dist.world_size()} x {config.grad_accum})")
    resume = _prepare_out(config, overwrite) if main else None
    dist.barrier()
    out = Path(config.out)
    if not main and (out / "checkpoint" / "state.json").is_file():
        resume = json.loads((out / "checkpoint" / "state.json").read_text())
    if main:
        atomic_write_json(out / "run_config.json", config.to_dict())
    splits = load_splits(config.task, config.data_dir, config.num_train, config.num_dev, config.num_test,
                         config.data_seed)  # bad data fails here, before the model loads
    if not splits.train:
        raise ZolmError(f"task {config.task} has no training examples with these settings")
    model, tok = models.load(config.model, config.dtype, device=config.device, device_map=config.device_map)
    kind = splits.task.kind
    train = encode_all(tok, splits.train, config.max_length)
    dev = encode_all(tok, splits.dev, config.max_length)
    test = encode_all(tok, splits.test, config.max_length)
    method = build_method(model, config, kind)
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
        replay = JsonlWriter(out / "replay.jsonl", truncate_after=start if resume else None) if main else _Quiet()
        if not resume:
            replay.write(replay_header(config.model, config.dtype, config.train_params, config.freeze_params,
                                       method.optimizer.header()))
    pad = tok.pad_token_id

    def evaluate(items, desc):
        return evaluate_items(method.model, tok, items, kind, config.eval_batch_size, desc)

    if config.eval_before and state["before"] is None and test:
        state["before"] = evaluate(test, "test (before)")
        metrics.write({"step": 0, **{f"test_{k}": v for k, v in state["before"].items()}})

    def save_ckpt():
        if main:
            save_checkpoint(out / "checkpoint", trainable, state, method.torch_optimizer)

    bar = progress(range(start + 1, config.steps + 1), desc=f"{config.method} {config.task}",
                   initial=start, total=config.steps, disable=not main)
    try:
        for step in bar:
            idx, epoch = batch_indices(len(train), config.batch_size, config.seed, step)
            parts = [training_batch([train[i] for i in p], kind, pad) for p in local_parts(idx, config.grad_accum)]
            lr = lr_at(config, step)
            t0 = time.perf_counter()
            result = method.step(parts, step, lr, epoch)
            state["train_time_s"] += time.perf_counter() - t0
            loss = result.loss if method.is_zo else result
            state["forward_passes"] += method.forwards_per_step * len(idx)
            record = {"step": step, "loss": loss, "lr": lr, "epoch": epoch, "forward_passes": state["forward_passes"]}
            metrics.write(record)
            if replay is not None:
                replay.write(result.to_json())
            bar.set_postfix(loss=f"{loss:.4f}")
            for cb in callbacks:
                cb(step, record)
            if dev and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
                res = evaluate(dev, f"dev @{step}")
                metrics.write({"step": step, **{f"dev_{k}": v for k, v in res.items()}})
                if state["best_dev"] is None or _metric(res) > _metric(state["best_dev"]):
                    state["best_dev"], state["best_step"] = res, step
                    if main:
                        save_checkpoint(out / "best", trainable, {"step": step, "dev": res})
                if main:
                    plot_loss(read_jsonl(out / "metrics.jsonl"), out / "loss.png", f"{config.method} on {config.task}")
            state["step"] = step
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps:
                save_ckpt()
    except DivergenceError as e:
        metrics.write({"step": state["step"] + 1, "event": "diverged", "message": str(e)})
        if main:
            atomic_write_json(out / "results.json",
                              {"status": "diverged", "message": str(e), **_summary(config, state)})
        where = (f"last good checkpoint: {out / 'checkpoint'} (step {_ckpt_step(out)})"
                 if (out / "checkpoint").exists() else "no checkpoint was written yet")
        raise ZolmError(f"training diverged: {e}; stopped, {where}") from None
    finally:
        bar.close()
        metrics.close()
    dist.barrier()  # rank 0 has written best/ before anyone reads it
    if state["best_step"] is not None and state["best_step"] != config.steps:
        weights, _ = load_checkpoint(out / "best")
        copy_into(trainable, weights)
    selected = state["best_step"] or config.steps
    after = evaluate(test, "test (after)") if test else {}
    if replay is not None:
        replay.write({"event": "end", "selected_step": selected})
        replay.close()
    results = {"status": "done", **_summary(config, state), "selected_step": selected, "after": after}
    if distributed:
        steps_here = max(1, state["step"] - start)
        results.update(workers=dist.world_size(), bytes_sent_per_step=method.reducer.bytes_sent / steps_here)
    if main:
        method.save(out, tok)
        atomic_write_json(out / "results.json", results)
        plot_loss(read_jsonl(out / "metrics.jsonl"), out / "loss.png", f"{config.method} on {config.task}")
    dist.barrier()
    return results


def _ckpt_step(out: Path) -> int:
    return json.loads((out / "checkpoint" / "state.json").read_text())["step"]


def _summary(config: FinetuneConfig, state: dict) -> dict:
    return {"task": config.task, "method": config.method, "model": config.model, "steps": state["step"],
            "before": state["before"], "best_dev": state["best_dev"], "best_step": state["best_step"],
            "forward_passes": state["forward_passes"], "train_time_s": round(state["train_time_s"], 2)}

