"""AdaZeta vs MeZO, MeZO-LoRA and fixed-Q AdaZeta at equal forward-pass budgets (SmolLM2-135M, CPU).

For each task and method it
  1. trains with zolm's runner (``zolm.train.loop.finetune``), the number of steps chosen so that every method
     spends the same budget of forward passes (example forwards: the loop's ``forward_passes`` counter; a ZO
     step costs 2 Q per example). Test accuracy before / after comes from the runner;
  2. rebuilds the weights at evenly spaced budget milestones from the run's replay log (no forward pass;
     bit-identical to training) and evaluates validation loss (the training objective: cross-entropy over
     the candidates' mean option log-likelihoods) and accuracy there;
  3. reports steps / forward passes to reach a target validation loss: the lowest validation loss MeZO-LoRA
     reaches within the budget (``to_target``: its curve minimum after step 0; the paper's comparison is
     against MeZO-LoRA) and its final one (``to_final``), trainable-parameter counts, and -- once, in
     subprocesses -- peak RSS of inference vs one step of each method on a batch of the first task.

Scale (full): batch 16, 128 training examples (8 steps per epoch, so AdaZeta's schedule visibly grows
within the budget), budget 4,096 example forwards per run (128 MeZO steps), 96 validation and 256 test
examples, 6 curve points. The schedule is the code form with beta fitted so Q reaches --q-target (5) at the
last epoch and capped at --q-max (5): a time-compressed version of the paper's ramp (docs/adazeta.md).

Reproduce:  .venv/bin/python benchmarks/adazeta.py                  (sst2, rte, wic; ~75 min on 2 cores)
            .venv/bin/python benchmarks/adazeta.py --quick          (~10 min)
Writes <out>/loss_curves.png, <out>/accuracy_curves.png and <out>/results.json; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment, peak_mib, reset_peak, run_worker  # noqa: E402

METHODS = ("mezo", "mezo-lora", "adazeta-fixed", "adazeta")
SCALE_KEYS = ("budget", "batch", "num_train", "num_val", "num_test", "points", "lr_schedule", "lr_mezo", "lr_lora",
              "eps_lora", "lr_adazeta", "eps_adazeta", "wd_adazeta", "tt_scaling", "fixed_q", "q_alpha", "q_beta",
              "q_max", "q_target")
FAMILY = {"mezo": "base", "mezo-lora": "base", "adazeta-fixed": "tt", "adazeta": "tt"}  # same model at step 0


def run_config(args, task: str, method: str, steps: int, out: Path, eval_before: bool):
    """The FinetuneConfig of one benchmark run (``adazeta-fixed`` is adazeta with q_schedule fixed)."""
    from zolm.train.config import FinetuneConfig

    kw = dict(out=str(out), model=args.model, task=task, data_dir=str(DATA), steps=steps, batch_size=args.batch,
              num_train=args.num_train, num_dev=0, num_test=args.num_test, eval_every=0, eval_before=eval_before,
              eval_batch_size=16, seed=args.seed, data_seed=args.seed, lr_schedule=args.lr_schedule)
    if method == "mezo":
        kw.update(method="mezo", lr=args.lr_mezo, eps=1e-3)
    elif method == "mezo-lora":
        kw.update(method="mezo-lora", lr=args.lr_lora, eps=args.eps_lora)
    else:
        kw.update(method="adazeta", lr=args.lr_adazeta, eps=args.eps_adazeta, weight_decay=args.wd_adazeta,
                  tt_scaling=args.tt_scaling,
                  q_alpha=args.q_alpha, q_beta=args.q_beta, q_max=args.q_max, q_target=args.q_target)
        kw.update(q_schedule="fixed", queries=args.fixed_q) if method == "adazeta-fixed" else kw.update(
            q_schedule="adaptive")
    return FinetuneConfig.of(**kw)


def forwards_of(config, n_train: int) -> list[int]:
    """Cumulative example forwards after each step, exactly as the runner counts them."""
    from zolm.train.batches import batch_indices
    from zolm.train.build import query_schedule

    sched = query_schedule(config) if config.estimator.schedule == "adaptive" else None
    out, total = [], 0
    for s in range(1, config.steps + 1):
        q = sched(batch_indices(n_train, config.batch_size, config.seed, s)[1]) if sched else 1
        total += 2 * q * config.batch_size
        out.append(total)
    return out


def steps_for_budget(args, task: str, method: str, n_train: int) -> int:
    """The most steps whose forward passes fit the budget (beta, when fitted, depends on the step count)."""
    hi = args.budget // (2 * args.batch)
    for steps in range(hi, 0, -1):
        if forwards_of(run_config(args, task, method, steps, Path("x"), False), n_train)[-1] <= args.budget:
            return steps
    raise SystemExit(f"budget {args.budget} is below one step of {method}")


def logged_config(run_dir: Path):
    """The FinetuneConfig a finished run recorded in its replay log header, and the log."""
    from zolm.train.config import FinetuneConfig
    from zolm.zo.replay import read_log

    log = read_log(run_dir / "replay.jsonl")
    return FinetuneConfig.from_dict({**log.header["config"], "out": ""}), log


def replayed(run_dir: Path, milestones: list[int]):
    """Yield (step, forward passes, method, tokenizer) at each budget milestone: the run's weights rebuilt from
    its replay log (no forward pass; bit-identical to training), the last step whose forwards fit the milestone."""
    from zolm import models
    from zolm.train.build import build_method
    from zolm.utils.io import read_jsonl
    from zolm.zo.replay import with_seeds

    config, log = logged_config(run_dir)
    fwd = {r["step"]: r["forward_passes"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    model, tok = models.load(config.model)
    method = build_method(model, config)
    done = 0
    for m in milestones:
        step = max([0] + [s for s, f in fwd.items() if f <= m])
        for rec in log.records[done:step]:
            method.optimizer.replay_(with_seeds(rec, method.optimizer.seeds_for))
        done = step
        yield step, fwd.get(step, 0), method, tok


def val_curve(run_dir: Path, items, milestones: list[int], cache: dict, key) -> tuple[list[dict], int]:
    """Validation loss / accuracy at each budget milestone, weights rebuilt from the replay log."""
    import torch.nn.functional as F

    from zolm.eval.evaluate import candidate_scores

    gold = torch.tensor([it.gold for it in items])
    points, method = [], None
    for step, fwd, method, tok in replayed(run_dir, milestones):
        if step == 0 and key in cache:
            points.append(dict(cache[key]))
            continue
        scores = torch.tensor(candidate_scores(method.model, items, tok.pad_token_id, 16, "val"))
        point = {"step": step, "forward_passes": fwd, "val_loss": float(F.cross_entropy(scores, gold)),
                 "val_accuracy": float((scores.argmax(-1) == gold).float().mean())}
        if step == 0:
            cache[key] = point
        points.append(point)
    return points, method.params.numel()


def _first(curve: list[dict], max_loss: float) -> dict | None:
    """Steps and forward passes at the first point with validation loss <= ``max_loss`` (None: never)."""
    hit = next((p for p in curve if p["val_loss"] <= max_loss), None)
    return None if hit is None else {"steps": hit["step"], "forward_passes": hit["forward_passes"]}


def memory_worker(mode: str, model_name: str, task: str, batch: int) -> dict:
    """Peak RSS of 3 loss forwards (inference) or 3 training steps of a method, after one warm-up."""
    from zolm import models
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.eval.scoring import task_loss_sum
    from zolm.train.build import build_method
    from zolm.train.config import FinetuneConfig
    from zolm.train.methods import StepBatch

    model, tok = models.load(model_name)
    split = load_splits(task, DATA, batch, 0, 0, 0)
    items = encode_all(tok, split.train, 1024)
    b = StepBatch([(0, training_batch(items, split.task.kind, tok.pad_token_id))], [split.task.kind], [1.0])
    if mode == "inference":
        def once(step):
            with torch.inference_mode():
                task_loss_sum(model, b.parts[0][1], b.kinds[0])
        trainable = 0
    else:
        method_name, extra = {"adazeta-q4": ("adazeta", dict(q_schedule="fixed", queries=4))}.get(mode, (mode, {}))
        config = FinetuneConfig.of(out="x", model=model_name, method=method_name, batch_size=batch, **extra)
        method = build_method(model, config)
        trainable = sum(p.numel() for p in method.trainable.values())

        def once(step):
            method.step(b, step, 1e-7)
    once(1)
    reset_peak()
    t = time.perf_counter()
    for step in range(2, 5):
        once(step)
    return {"mode": mode, "peak_mib": peak_mib(), "seconds": (time.perf_counter() - t) / 3, "trainable": trainable}


def alignment_worker(model_name: str, task: str, batch: int, max_q: int) -> dict:
    """Cosine between the Q-query ZO estimate and the true gradient of the trained set, Q = 1, 2, 4, ...

    The mechanism AdaZeta relies on (papers.md 1.1, 9.2): a Q-query SPSA estimate's cosine with the gradient
    is ~ sqrt(Q / d), so fewer trained coordinates d (TT adapters) and more queries Q align better. Also the
    squared gradient norm ||g||^2 (a ZO step's expected first-order descent is lr ||g||^2) and how many
    coordinates have a non-zero gradient at the start (an adapter with a zeroed factor has none in the others).
    """
    return {name: _alignment(model_name, name, task, batch, max_q) for name in ("adazeta", "mezo-lora", "mezo")}


def _alignment(model_name: str, method: str, task: str, batch: int, max_q: int) -> dict:
    from zolm import models
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.eval.scoring import task_loss
    from zolm.train.build import build_method
    from zolm.train.config import FinetuneConfig
    from zolm.zo.rng import derive_seed, draw, tensor_key
    from zolm.zo.spsa import spsa_projected_grad

    model, tok = models.load(model_name)
    split = load_splits(task, DATA, batch, 0, 0, 0)
    b = training_batch(encode_all(tok, split.train, 1024), split.task.kind, tok.pad_token_id)
    config = FinetuneConfig.of(out="x", model=model_name, method=method, batch_size=batch)
    params = build_method(model, config).params
    model.eval()
    for p in params.params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(task_loss(model, b, split.task.kind), params.params)
    for p in params.params:
        p.requires_grad_(False)
    gnorm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))

    def loss_fn() -> float:
        with torch.inference_mode():
            return float(task_loss(model, b, split.task.kind))

    est = [torch.zeros_like(p) for p in params.params]
    cos = {}
    for q in range(max_q):
        seed = derive_seed(4321, q)
        mu, _, _ = spsa_projected_grad(loss_fn, params, seed, config.estimator.eps, config.estimator.sampler)
        for i, (p, e) in enumerate(zip(params.params, est)):
            e.add_(draw(p.numel(), tensor_key(seed, i), config.estimator.sampler).view_as(p), alpha=mu)
        if (q + 1) & q == 0:  # Q = 1, 2, 4, 8, ...
            dot = sum((e.double() * g.double()).sum() for e, g in zip(est, grads))
            enorm = torch.sqrt(sum((e.double() ** 2).sum() for e in est))
            cos[q + 1] = round(float(dot / (enorm * gnorm)), 5)
    d = params.numel()
    live = sum(int((g != 0).sum()) for g in grads)  # coordinates the loss moves at the start (B = 0 / zeroed core)
    return {"trainable": d, "grad_nonzero": live, "grad_norm_sq": float(gnorm**2), "cosine": cos,
            "sqrt_q_over_d": {q: round((q / d) ** 0.5, 5) for q in cos}}


def plot(results: dict, tasks: list[str], out: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zolm.utils.io import atomic_write_bytes, read_jsonl

    rows = 2 if what == "loss" else 1
    fig, axes = plt.subplots(rows, len(tasks), figsize=(4.6 * len(tasks), 3.6 * rows), dpi=110, squeeze=False)
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange", "tab:red")))
    for j, task in enumerate(tasks):
        for method, r in results[task].items():
            pts = r["curve"]
            x = [p["forward_passes"] for p in pts]
            if what == "loss":
                train = [(m["forward_passes"], m["loss"]) for m in read_jsonl(Path(r["run_dir"]) / "metrics.jsonl")
                         if "loss" in m]
                w = max(1, len(train) // 10)
                avg = [sum(v for _, v in train[max(0, i - w + 1):i + 1]) / len(train[max(0, i - w + 1):i + 1])
                       for i in range(len(train))]
                axes[0][j].plot([f for f, _ in train], avg, color=colors[method], label=method)
                axes[1][j].plot(x, [p["val_loss"] for p in pts], "o-", color=colors[method], label=method)
            else:
                axes[0][j].plot(x, [p["val_accuracy"] for p in pts], "o-", color=colors[method], label=method)
        axes[0][j].set_title(task)
        axes[-1][j].set_xlabel("forward passes (examples)")
    if what == "loss":
        axes[0][0].set_ylabel("training loss (moving avg)")
        axes[1][0].set_ylabel("validation loss")
        target = [results[t].get("mezo-lora", {}).get("target_val_loss") for t in tasks]
        for j, v in enumerate(target):
            if v is not None:
                axes[1][j].axhline(v, color="tab:blue", ls=":", lw=0.8)
    else:
        axes[0][0].set_ylabel("validation accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M: equal forward-pass budgets ({what})")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out / f"{what}_curves.png", buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "MODEL", "TASK", "BATCH"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,rte,wic")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS)} (without mezo-lora: no to_target / to_final)")
    ap.add_argument("--out", default="runs/adazeta")
    ap.add_argument("--quick", action="store_true", help="tiny budgets to check the pipeline (~10 min)")
    ap.add_argument("--budget", type=int, default=4096, help="example forward passes per run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-train", type=int, default=128)
    ap.add_argument("--num-val", type=int, default=96)
    ap.add_argument("--num-test", type=int, default=256)
    ap.add_argument("--points", type=int, default=6, help="validation points after step 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr-schedule", default="constant", help="constant (the papers') or linear (decays to 0)")
    ap.add_argument("--lr-mezo", type=float, default=3e-5)
    ap.add_argument("--lr-lora", type=float, default=3e-3)
    ap.add_argument("--eps-lora", type=float, default=1e-2)
    ap.add_argument("--lr-adazeta", type=float, default=3e-4)
    ap.add_argument("--eps-adazeta", type=float, default=1e-3)
    ap.add_argument("--wd-adazeta", type=float, default=0.0)
    ap.add_argument("--tt-scaling", type=float, default=1.0, help="adapter scaling s (paper 1.0)")
    ap.add_argument("--fixed-q", type=int, default=1)
    ap.add_argument("--q-alpha", type=float, default=0.85)
    ap.add_argument("--q-beta", type=float, default=None, help="default: fitted to reach --q-target")
    ap.add_argument("--q-max", type=int, default=5)
    ap.add_argument("--q-target", type=float, default=5.0)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-alignment", action="store_true")
    ap.add_argument("--max-q", type=int, default=16, help="queries for the gradient-alignment measurement")
    args = ap.parse_args()
    if args.worker:
        mode, model, task, batch = args.worker
        if mode.startswith("alignment"):
            print(json.dumps(alignment_worker(model, task, int(batch), int(mode.split(":")[1]))))
        else:
            print(json.dumps(memory_worker(mode, model, task, int(batch))))
        return
    if args.quick:
        args.budget, args.num_train, args.num_val, args.num_test, args.points = 384, 32, 32, 32, 3
        args.q_target = args.q_max = 3
        args.max_q = 4
    import logging
    import os

    os.environ.setdefault("ZOLM_NO_PROGRESS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from zolm import models
    from zolm.data.encode import encode_all
    from zolm.data.tasks import load_splits
    from zolm.train.loop import finetune
    from zolm.utils.io import read_jsonl

    tasks, out, t0 = args.tasks.split(","), Path(args.out), time.time()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if unknown := set(args.methods.split(",")) - set(METHODS):
        raise SystemExit(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    tok = models.load_tokenizer(args.model)
    milestones = [round(args.budget * k / args.points) for k in range(args.points + 1)]
    results: dict = {}
    for task in tasks:
        split = load_splits(task, DATA, args.num_train, args.num_val, args.num_test, args.seed)
        val = encode_all(tok, split.dev, 1024)
        cache: dict = {}
        results[task] = {}
        for method in methods:
            steps = steps_for_budget(args, task, method, len(split.train))
            run_dir = out / task / method
            first_of_family = FAMILY[method] not in {FAMILY[m] for m in results[task]}
            config = run_config(args, task, method, steps, run_dir, eval_before=first_of_family)
            logging.info("%s %s: %d steps", task, method, steps)
            res = finetune(config, overwrite=True)
            curve, trainable = val_curve(run_dir, val, milestones, cache, FAMILY[method])
            queries = [m["queries"] for m in read_jsonl(run_dir / "metrics.jsonl") if "queries" in m]
            acc_before = (res["before"] or {}).get("accuracy") if first_of_family else next(
                r["acc_before"] for m, r in results[task].items() if FAMILY[m] == FAMILY[method])
            results[task][method] = {
                "steps": steps, "forward_passes": res["forward_passes"], "trainable_params": trainable,
                "lr": config.optim.lr, "eps": config.estimator.eps, "mean_queries": sum(queries) / len(queries),
                "max_queries": max(queries), "acc_before": acc_before,
                "acc_after": res["after"].get("accuracy"), "train_time_s": res["train_time_s"], "curve": curve,
                "run_dir": str(run_dir)}
        if "mezo-lora" not in results[task]:
            continue
        lora = results[task]["mezo-lora"]["curve"]
        target = min(p["val_loss"] for p in lora[1:])
        drop = lora[0]["val_loss"] - target
        final = lora[-1]["val_loss"]
        results[task]["mezo-lora"].update(target_val_loss=target, target_drop=drop, final_val_loss=final)
        for r in results[task].values():
            start = r["curve"][0]["val_loss"]
            r["to_target"] = _first(r["curve"], target)
            r["to_final"] = _first(r["curve"][1:], final)
            r["to_target_drop"] = _first(r["curve"][1:], start - drop) if drop > 0 else None
    plot(results, tasks, out, "loss")
    plot(results, tasks, out, "accuracy")
    memory = {}
    if not args.no_memory:
        for mode in ("inference", "mezo", "mezo-lora", "adazeta", "adazeta-q4", "fo-tt"):
            memory[mode] = run_worker(__file__, mode, args.model, tasks[0], str(args.batch))
        memory["zo_over_inference"] = {m: round(memory[m]["peak_mib"] / memory["inference"]["peak_mib"], 3)
                                       for m in ("mezo", "mezo-lora", "adazeta", "adazeta-q4", "fo-tt")}
    alignment = {} if args.no_alignment else run_worker(__file__, f"alignment:{args.max_q}", args.model, tasks[0],
                                                          str(args.batch))
    summary = {"benchmark": "adazeta", "model": args.model, "quick": args.quick,
               "scale": {k: getattr(args, k) for k in SCALE_KEYS}, "seed": args.seed, "methods": methods,
               "target": "to_target: first point with validation loss <= the lowest MeZO-LoRA reaches within the "
                         "budget (after step 0); to_final: first point after step 0 with validation loss <= "
                         "MeZO-LoRA's final one; to_target_drop: first point whose loss is below the method's own "
                         "start by at least MeZO-LoRA's largest drop (fair when inits differ)",
               "results": {t: {m: {k: v for k, v in r.items() if k != "run_dir"} for m, r in rs.items()}
                           for t, rs in results.items()},
               "memory": memory, "alignment": alignment, "wall_s": round(time.time() - t0), **environment()}
    from zolm.utils.io import atomic_write_json

    atomic_write_json(out / "results.json", summary)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
