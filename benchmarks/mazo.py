"""MaZO against multi-task MeZO, masked MeZO baselines and first-order fine-tuning on a task mixture.

Three parts, each measurement in its own subprocess (benchmarks/_common.run_worker):

1. accuracy: ``zolm.finetune`` on the mixture (default sst2, rte, wic, copa; uniform, exact proportions) for
   ``mezo`` (all parameters), ``mezo-random-mask``, ``mazo`` (and ``mezo-magnitude-mask`` with --methods) at
   S steps of batch B, and ``fo-adamw``. Budgets are equal in forward passes: a ZO step costs 2 forwards per
   example, an FO step 1 forward + 1 backward per example (zolm's ``forward_passes`` counter), so FO runs
   2 S B / B_fo steps; its dev evaluation at the half-way step is FO at equal *examples seen*. Wall time,
   examples seen and forward passes are reported for every run; MaZO's calibration (one forward + backward per
   calibration example) is reported separately. Zero-shot = the first run's evaluation before training.
2. variance (papers.md 9.2): at the initial weights and one mixture batch, the true gradient by backprop, then
   over ``--seeds`` seeds the one-query SPSA estimate of MeZO (all parameters), MeZO over the maskable weights
   (no mask), each masked method (perturb + update masked) and "update-only" masking; see zolm.masks.variance.
3. overhead: median step time and peak RSS of a MeZO step vs masked steps (masks loaded from the runs above),
   the time of one perturbation pass, and the bytes of the bit-packed masks.

Reproduce:  .venv/bin/python benchmarks/mazo.py --quick          (minutes: pipeline check, numbers meaningless)
            .venv/bin/python benchmarks/mazo.py                  (see docs/mazo.md for the scale and time)
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment, peak_mib, reset_peak, run_worker  # noqa: E402

ZO_LR, MASKED_LR, FO_LR = 3e-5, 3e-4, 1e-5


def base_config(a: argparse.Namespace, method: str, out: Path) -> dict:
    masked = method not in ("mezo", "fo-adamw")
    fo = method == "fo-adamw"
    steps = a.steps * 2 * a.batch_size // a.fo_batch_size if fo else a.steps
    return dict(out=str(out / method), model=a.model, task=a.tasks, data_dir=str(a.data_dir), method=method,
                steps=steps, batch_size=a.fo_batch_size if fo else a.batch_size,
                lr=a.lr_fo if fo else (a.lr_masked if masked else a.lr_mezo), num_train=a.num_train,
                num_dev=a.num_dev, num_test=a.num_test, eval_every=max(1, steps // 2), eval_batch_size=16,
                max_length=a.max_length, mask_ratio=a.mask_ratio, mazo_calib_examples=a.calib_examples,
                checkpoint_every=0, eval_before=False)


# ------------------------------------------------------------------------------------------------ workers
def worker_train(cfg: dict) -> dict:
    from zolm.train.config import FinetuneConfig
    from zolm.train.loop import finetune

    reset_peak()
    res = finetune(FinetuneConfig.of(**cfg), overwrite=True)
    out = {"before": res["before"], "after": res["after"], "best_dev": res["best_dev"], "steps": res["steps"],
           "selected_step": res["selected_step"], "forward_passes": res["forward_passes"],
           "train_time_s": res["train_time_s"], "run_peak_mib": round(peak_mib())}
    rows = [json.loads(x) for x in (Path(cfg["out"]) / "metrics.jsonl").read_text().splitlines()]
    out["dev_curve"] = {r["step"]: r["dev_average"] for r in rows if "dev_average" in r}
    meta = Path(cfg["out"]) / "masks.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        out["mask"] = {k: m.get(k) for k in ("masked_numel", "maskable_numel", "packed_bytes", "overlap",
                                             "term_means", "calibration")}
    return out


def _setup(cfg: dict):
    """Model, the ZO method of ``cfg`` (masks loaded from its run directory) and the mixture's first batch."""
    from zolm import models
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.train.batches import Mixture
    from zolm.train.build import build_method
    from zolm.train.config import FinetuneConfig
    from zolm.train.methods import StepBatch

    config = FinetuneConfig.of(**cfg)
    model, tok = models.load(config.model)
    splits = [load_splits(t, config.data_dir, config.num_train, config.num_dev, config.num_test, config.data_seed)
              for t in config.tasks]
    train = [encode_all(tok, s.train, config.max_length) for s in splits]
    kinds = [s.task.kind for s in splits]
    per_task, _ = Mixture([len(t) for t in train], config.batch_size, config.seed).step(1)
    batch = StepBatch(parts=[(t, training_batch([train[t][i] for i in idx], kinds[t], tok.pad_token_id))
                             for t, idx in enumerate(per_task) if idx],
                      kinds=kinds, weights=[len(i) / config.batch_size for i in per_task])
    return model, build_method(model, config, run_dir=Path(config.out)), batch


def worker_variance(cfgs: dict, seeds: int) -> dict:
    import re

    from zolm.eval.scoring import task_loss_sum
    from zolm.masks.variance import estimator_stats, projected_grads
    from zolm.train.build import build_method
    from zolm.train.config import FinetuneConfig
    from zolm.zo.rng import unpack_mask
    from zolm.zo.spsa import ParamSet

    model, mezo, batch = _setup(cfgs["mezo"])
    for p in model.parameters():
        p.requires_grad_(True)
    counts = batch.local_counts()
    for t, mb in batch.parts:  # the step's loss: sum_t w_t L_t (zolm.train.methods.StepBatch)
        (batch.weights[t] * task_loss_sum(model, mb, batch.kinds[t]) / counts[t]).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    full_sq = sum(float((g.double() ** 2).sum()) for g in grads.values())
    loss = mezo.loss_fn(batch)
    seed_list = list(range(1, seeds + 1))
    table = {}
    mus_full = projected_grads(loss, mezo.params, seed_list)
    table["mezo (all parameters)"] = estimator_stats(mus_full, seed_list, mezo.params, grads)
    masked = {}  # masked methods on the same model, their masks loaded from their runs
    for method, cfg in cfgs.items():
        if method in ("mezo", "fo-adamw"):
            continue
        m = build_method(model, FinetuneConfig.of(**cfg), run_dir=Path(cfg["out"]))
        masked[method] = m
        if "mezo (maskable weights, no mask)" not in table:
            plain = ParamSet(model, include=[f"^{re.escape(n)}$" for n in m.params.names])
            mus = projected_grads(loss, plain, seed_list)
            table["mezo (maskable weights, no mask)"] = estimator_stats(mus, seed_list, plain, grads, full_sq=full_sq)
        mus = projected_grads(loss, m.params, seed_list)
        table[method] = estimator_stats(mus, seed_list, m.params, grads, full_sq=full_sq)
    if "mazo" in masked:
        ps = masked["mazo"].params
        update = {n: unpack_mask(mk, p.numel()).view(p.shape) for n, p, mk in zip(ps.names, ps.params, ps.masks)}
        table["mazo mask on the update only"] = estimator_stats(mus_full, seed_list, mezo.params, grads,
                                                                update=update, same_mask=False)
    return {k: {kk: (round(vv, 6) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in table.items()}


def worker_step(cfg: dict, reps: int) -> dict:
    model, method, batch = _setup(cfg)
    loss = method.loss_fn(batch)
    loss()
    method.step(batch, 1, 0.0)  # warm-up; lr 0 leaves the weights as they are (up to restore drift)
    reset_peak()
    fwd, steps, passes = [], [], []
    for r in range(reps):
        t = time.perf_counter()
        loss()
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        method.step(batch, 2 + r, 0.0)
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        method.optimizer.apply_(12345, 1e-3)
        method.optimizer.apply_(12345, -1e-3)
        passes.append((time.perf_counter() - t) / 2)
    ps = method.params
    return {"fwd_s": statistics.median(fwd), "step_s": statistics.median(steps),
            "pass_s": statistics.median(passes), "step_peak_mib": round(peak_mib()),
            "trained_numel": ps.numel(), "tensors": len(ps),
            "mask_bytes": sum(int(m.numel()) for m in ps.masks if m is not None),
            "dense_bytes_covered": sum(4 * p.numel() for p, m in zip(ps.params, ps.masks) if m is not None)}


# ------------------------------------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"))
    ap.add_argument("--quick", action="store_true", help="tiny scale: checks the pipeline in a few minutes")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,rte,wic,copa")
    ap.add_argument("--methods", default="mezo,mezo-random-mask,mazo,fo-adamw")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("/tmp/zolm-bench-mazo"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fo-batch-size", type=int, default=16)
    ap.add_argument("--lr-mezo", type=float, default=ZO_LR)
    ap.add_argument("--lr-masked", type=float, default=MASKED_LR)
    ap.add_argument("--lr-fo", type=float, default=FO_LR)
    ap.add_argument("--mask-ratio", type=float, default=0.05)
    ap.add_argument("--calib-examples", type=int, default=64)
    ap.add_argument("--num-train", type=int, default=1000)
    ap.add_argument("--num-dev", type=int, default=100)
    ap.add_argument("--num-test", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=32, help="variance part: SPSA seeds (0: skip the part)")
    ap.add_argument("--reps", type=int, default=5, help="overhead part: timed steps (0: skip the part)")
    a = ap.parse_args()
    if a.worker:
        kind, payload = a.worker[0], json.loads(a.worker[1])
        fn = {"train": lambda p: worker_train(p["cfg"]), "variance": lambda p: worker_variance(p["cfgs"], p["seeds"]),
              "step": lambda p: worker_step(p["cfg"], p["reps"])}[kind]
        print(json.dumps(fn(payload)))
        return
    if a.quick:
        a.steps, a.num_train, a.num_dev, a.num_test, a.seeds, a.reps, a.calib_examples = 6, 64, 8, 12, 4, 2, 16
    methods = a.methods.split(",")
    cfgs = {m: base_config(a, m, a.out) for m in methods}
    cfgs[methods[0]]["eval_before"] = True  # zero-shot, once (every run shares the test sets)
    t0 = time.perf_counter()
    runs = {m: run_worker(__file__, "train", json.dumps({"cfg": c}), timeout=4 * 3600) for m, c in cfgs.items()}
    t_train = time.perf_counter() - t0
    variance = run_worker(__file__, "variance", json.dumps({"cfgs": cfgs, "seeds": a.seeds}),
                          timeout=3600) if a.seeds else None
    steps = {m: run_worker(__file__, "step", json.dumps({"cfg": c, "reps": a.reps}))
             for m, c in cfgs.items() if m != "fo-adamw"} if a.reps else {}
    names = a.tasks.split(",")

    def acc(res: dict) -> dict:
        """Accuracy per task and on average, with binomial standard errors (test examples independent):
        se_t = sqrt(p (1 - p) / n_t), se_avg = sqrt(sum se_t^2) / T."""
        se = {t: (res[t]["accuracy"] * (1 - res[t]["accuracy"]) / res[t]["n"]) ** 0.5 for t in names}
        return {t: round(res[t]["accuracy"], 4) for t in names} | {"average": round(res["average"], 4)} | {
            "se": {t: round(v, 4) for t, v in se.items()} | {
                "average": round(sum(v * v for v in se.values()) ** 0.5 / len(names), 4)}}

    zero = runs[methods[0]]["before"]
    accuracy = {"zero-shot": acc(zero)} | {m: acc(r["after"]) for m, r in runs.items()}
    budget = {m: {"steps": r["steps"], "batch": cfgs[m]["batch_size"], "lr": cfgs[m]["lr"],
                  "examples_seen": r["steps"] * cfgs[m]["batch_size"], "forward_passes": r["forward_passes"],
                  "train_time_s": r["train_time_s"], "selected_step": r["selected_step"],
                  "dev_average_curve": r["dev_curve"], "run_peak_mib": r["run_peak_mib"],
                  **({"calibration": r["mask"]["calibration"]} if "mask" in r and r["mask"]["calibration"] else {})}
              for m, r in runs.items()}
    base = steps.get("mezo")
    overhead = {m: {**s, "step_over_mezo": round(s["step_s"] / base["step_s"], 3) if base else None,
                    "peak_over_mezo": round(s["step_peak_mib"] / base["step_peak_mib"], 3) if base else None}
                for m, s in steps.items()}
    masks = {m: r["mask"] for m, r in runs.items() if "mask" in r}
    print(json.dumps({"benchmark": "mazo", "quick": a.quick, "model": a.model, "tasks": names,
                      "scale": {k: getattr(a, k) for k in ("steps", "batch_size", "fo_batch_size", "mask_ratio",
                                                          "calib_examples", "num_train", "num_dev", "num_test",
                                                          "seeds", "max_length")},
                      "accuracy": accuracy, "budget": budget, "variance": variance, "overhead": overhead,
                      "masks": masks, "wall_s": {"train": round(t_train), "total": round(time.perf_counter() - t0)},
                      **environment()}), flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
