"""Which importance keeps the gradient? MaZO's multi-task mask under each importance variant (issue 13).

Per task (default sst2, rte, wic, copa): the first ``--calib`` training examples (mini-batches of 8) give the
calibration statistics of :func:`zolm.masks.calibrate.gradient_stats` (fisher and activation curvature both
collected, once); the next ``--held-out`` training examples, disjoint from them, give the *held-out* gradient of
the uniform mixture loss: the gradient ZO has to estimate during training, which a good mask keeps. Each variant
scores every maskable weight with :func:`zolm.masks.importance.normalized_task_score` (summed over tasks, top
rho per row, as ``mazo`` builds it):

    fisher       S = g^2 / (2 (mean_b g_b^2 + 1e-8 mean)) + g^2       (zolm's old default)
    fisher-damp1 the same with lambda = 1 x mean(h)                   (damping near mean(h))
    activation   S = g^2 / (2 (mean x_j^2 + 1e-8 mean)) + g^2         (row-wise curvature)
    greedy       S = g^2                                              (first-order decrease alone)
    magnitude    |W|;   random: k uniform per row                     (the baselines)

Reported per variant: ``mass`` = ||U g_ho||^2 / ||g_ho||^2 over the maskable weights (held-out gradient; also per
task and on the calibration gradient itself), and the one-query SPSA estimator on one held-out mixture batch over
``--seeds`` seeds (:func:`zolm.masks.variance.estimator_stats`): its cosine with the full gradient of that batch
(``cos_full``; the estimate is better aligned the more mass the mask keeps, at equal d_eff) and its relative
MSE against the masked target.

Reproduce:  .venv/bin/python benchmarks/mazo_importance.py            (~10 min on 2 CPU cores, ~6 GiB)
            .venv/bin/python benchmarks/mazo_importance.py --quick    (tiny scale: pipeline check)
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, environment  # noqa: E402

VARIANTS = ("fisher", "fisher-damp1", "activation", "greedy", "magnitude", "random")


def _configs():
    from zolm.masks.importance import ImportanceConfig

    return {"fisher": ImportanceConfig(curvature="fisher"),
            "fisher-damp1": ImportanceConfig(curvature="fisher", damping=1.0),
            "activation": ImportanceConfig(curvature="activation")}


def batches_of(items: list, kind: str, pad_id: int, size: int = 8) -> list[dict]:
    from zolm.data.encode import training_batch

    return [training_batch(items[i:i + size], kind, pad_id) for i in range(0, len(items), size)]


def held_out_grads(model, names: list[str], tasks: list[tuple[str, str, list[dict]]]) -> dict:
    """Per task: the mean gradient of its loss over its held-out batches, ``{task: {name: [out, in]}}``."""
    from zolm.eval.scoring import task_loss
    from zolm.masks.calibrate import gradient_stats

    out = {}
    for name, kind, batches in tasks:
        stats = gradient_stats(model, batches, lambda m, b, k=kind: task_loss(m, b, k), names)
        out[name] = {n: s.mean_grad() for n, s in stats.items()}
        del stats
    return out


def mass(masks: dict[str, torch.Tensor] | None, grads: dict[str, torch.Tensor]) -> float:
    """||U g||^2 / ||g||^2 (U = None: the whole set)."""
    total = sum(float((g.double() ** 2).sum()) for g in grads.values())
    if masks is None:
        return 1.0
    kept = sum(float(((g * masks[n]).double() ** 2).sum()) for n, g in grads.items())
    return kept / max(total, 1e-300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,rte,wic,copa")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--calib", type=int, default=32, help="calibration examples per task")
    ap.add_argument("--held-out", type=int, default=64, help="held-out examples per task (disjoint)")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.calib, a.held_out, a.seeds, a.tasks = 8, 8, 2, "sst2,rte"
    t0 = time.perf_counter()
    from zolm import models
    from zolm.data.encode import encode_all
    from zolm.data.tasks import load_splits
    from zolm.eval.scoring import task_loss
    from zolm.masks.build import maskable_weights
    from zolm.masks.calibrate import gradient_stats
    from zolm.masks.importance import greedy_term, normalized_task_score, row_normalize
    from zolm.masks.multitask import magnitude_mask, random_mask, topk_row_mask
    from zolm.masks.variance import estimator_stats, projected_grads
    from zolm.zo.rng import derive_seed
    from zolm.zo.spsa import ParamSet

    torch.manual_seed(0)
    model, tok = models.load(a.model)
    model.eval()
    weights = maskable_weights(model)
    names = list(weights)
    pad = tok.pad_token_id
    calib, held = [], []
    for t in a.tasks.split(","):
        s = load_splits(t, a.data_dir, a.calib + a.held_out, 0, 1, 0)
        enc = encode_all(tok, s.train, a.max_length)
        calib.append((t, s.task.kind, batches_of(enc[:a.calib], s.task.kind, pad)))
        held.append((t, s.task.kind, batches_of(enc[a.calib:], s.task.kind, pad)))

    # calibration statistics once (both curvatures), scores of every variant summed over tasks
    cfgs = _configs()
    totals: dict[str, dict[str, torch.Tensor]] = {v: {} for v in ("fisher", "fisher-damp1", "activation", "greedy")}
    calib_grad: dict[str, dict[str, torch.Tensor]] = {}
    t_cal = time.perf_counter()
    for t, kind, batches in calib:
        stats = gradient_stats(model, batches, lambda m, b, k=kind: task_loss(m, b, k), names, activations=True)
        calib_grad[t] = {}
        for n in names:
            st, w = stats[n], weights[n]
            calib_grad[t][n] = st.mean_grad()
            scores = {v: normalized_task_score(st, w, c) for v, c in cfgs.items()}
            scores["greedy"] = row_normalize(greedy_term(st.mean_grad()))
            for v, sc in scores.items():
                totals[v][n] = totals[v][n].add_(sc) if n in totals[v] else sc
            del stats[n]
    t_cal = time.perf_counter() - t_cal
    masks = {v: {n: topk_row_mask(s, a.ratio) for n, s in tot.items()} for v, tot in totals.items()}
    del totals
    masks["magnitude"] = {n: magnitude_mask(w, a.ratio) for n, w in weights.items()}
    masks["random"] = {n: random_mask(tuple(w.shape), a.ratio, derive_seed(0, 0x3A5C, i))
                       for i, (n, w) in enumerate(weights.items())}

    # held-out gradient of each task and of the uniform mixture
    per_task = held_out_grads(model, names, held)
    mix = {n: sum(per_task[t][n] for t in per_task) / len(per_task) for n in names}
    calib_mix = {n: sum(calib_grad[t][n] for t in calib_grad) / len(calib_grad) for n in names}
    table = {}
    for v in VARIANTS:
        m = masks[v]
        table[v] = {"mass_held_out": round(mass(m, mix), 5),
                    "mass_per_task": {t: round(mass(m, g), 5) for t, g in per_task.items()},
                    "mass_calibration": round(mass(m, calib_mix), 5),
                    "overlap_with_fisher": round(sum(int((m[n] & masks["fisher"][n]).sum()) for n in names)
                                                 / max(1, sum(int(m[n].sum()) for n in names)), 4)}

    # the one-query SPSA estimate on one held-out mixture batch (the first held-out batch of every task)
    batch = [(kind, b[0]) for _, kind, b in held]

    def loss() -> float:
        with torch.no_grad():
            return float(sum(task_loss(model, b, k) for k, b in batch) / len(batch))

    for p in model.parameters():
        p.requires_grad_(False)
    targets = [weights[n] for n in names]
    for p in targets:
        p.requires_grad_(True)
    g = torch.autograd.grad(sum(task_loss(model, b, k) for k, b in batch) / len(batch), targets)
    for p in targets:
        p.requires_grad_(False)
    grads = dict(zip(names, (x.detach() for x in g)))
    full_sq = sum(float((x.double() ** 2).sum()) for x in grads.values())
    seeds = list(range(1, a.seeds + 1))
    include = [f"^{re.escape(n)}$" for n in names]
    def spsa(mask: dict[str, torch.Tensor] | None) -> dict:
        ps = ParamSet(model, include=include, masks=mask)
        st = estimator_stats(projected_grads(loss, ps, seeds), seeds, ps, grads, full_sq=full_sq)
        return {k: (round(x, 6) if isinstance(x, float) else x) for k, x in st.items()
                if k in ("d_eff", "mass", "rel_mse", "cos_full", "cos_target")}

    for v in VARIANTS:
        table[v]["spsa"] = spsa(masks[v])
    table["no mask (maskable weights)"] = {"spsa": spsa(None)}
    print(json.dumps({"benchmark": "mazo_importance", "model": a.model, "tasks": a.tasks.split(","),
                      "ratio": a.ratio, "calib_per_task": a.calib, "held_out_per_task": a.held_out,
                      "seeds": a.seeds, "variants": table, "calibration_s": round(t_cal, 1),
                      "wall_s": round(time.perf_counter() - t0), **environment()}), flush=True)


if __name__ == "__main__":
    main()
