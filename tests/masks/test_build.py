"""Building a multi-task mask on a tiny model: per-task normalisation makes it ignore each task's loss scale."""

import pytest
import torch

import zolm.masks.build as build
from zolm import models
from zolm.data.encode import encode_all
from zolm.data.tasks import load_splits
from zolm.errors import ZolmError
from zolm.masks.build import MaskRecipe, TaskData, build_masks, importance_masks, maskable_weights
from zolm.masks.importance import ImportanceConfig, task_score
from zolm.masks.multitask import check_rows, topk_row_mask


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, data_dir):
    model, tok = models.load(tiny_llama_dir)
    tasks = []
    for name in ("sst2", "copa"):
        s = load_splits(name, data_dir, num_train=8, num_dev=0, num_test=0)
        tasks.append(TaskData(name, s.task.kind, encode_all(tok, s.train)))
    return model, tasks, tok.pad_token_id


@pytest.mark.parametrize("imp", [ImportanceConfig(alpha=0.0, curvature="fisher"),
                                 ImportanceConfig(alpha=1.0, beta=0.5, term_norm=True, curvature="fisher"),
                                 ImportanceConfig(curvature="activation")], ids=["global", "term_norm", "rowwise"])
def test_aggregated_mask_ignores_the_scale_of_one_tasks_loss(tiny, monkeypatch, imp):
    model, tasks, pad = tiny
    weights = maskable_weights(model)
    recipe = MaskRecipe(ratio=0.1, importance=imp, calib_examples=8, calib_batch_size=4)
    plain, _ = importance_masks(model, weights, tasks, recipe, pad)
    check_rows(plain, 0.1)
    real = build.task_loss
    monkeypatch.setattr(build, "task_loss", lambda m, b, k: real(m, b, k) * (4.0 if k == "multiple_choice" else 1.0))
    scaled, _ = importance_masks(model, weights, tasks, recipe, pad)
    assert all(torch.equal(plain[n], scaled[n]) for n in plain)


def test_without_row_normalisation_the_scaled_task_would_dominate(tiny, monkeypatch):
    """The check above can fail: summing raw row-wise scores lets the 16x larger task take over the mask."""
    from zolm.masks.calibrate import gradient_stats

    model, tasks, pad = tiny
    weights = maskable_weights(model)
    cfg = ImportanceConfig(curvature="activation")
    recipe = MaskRecipe(ratio=0.1, importance=cfg, calib_examples=8, calib_batch_size=4)

    def raw_scores(scale: float) -> dict[str, torch.Tensor]:
        total = {}
        for t in tasks:
            f = scale if t.kind == "multiple_choice" else 1.0
            stats = gradient_stats(model, build.calibration_batches(t, recipe, pad),
                                   lambda m, b, k=t.kind, f=f: f * build.task_loss(m, b, k), list(weights), True)
            for n in weights:
                s = task_score(stats[n], weights[n], cfg)
                total[n] = total[n] + s if n in total else s
        return {n: topk_row_mask(s, 0.1) for n, s in total.items()}

    a, b = raw_scores(1.0), raw_scores(4.0)
    assert not all(torch.equal(a[n], b[n]) for n in a)


def test_build_masks_kinds_and_report(tiny):
    model, tasks, pad = tiny
    weights = maskable_weights(model)
    for kind in ("importance", "random", "magnitude"):
        recipe = MaskRecipe(kind=kind, ratio=0.2, calib_examples=4, calib_batch_size=2)
        masks, report = build_masks(model, weights, recipe, tasks, pad)
        check_rows(masks, 0.2)
        assert report["recipe"]["kind"] == kind and report["masked_numel"] == sum(int(m.sum()) for m in masks.values())
        assert report["maskable_numel"] == sum(w.numel() for w in weights.values())
    with pytest.raises(ZolmError, match="needs calibration data"):
        build_masks(model, weights, MaskRecipe(kind="importance"), [], pad)
    # one calibration mini-batch: the fisher curvature splits it in two instead of stopping
    fisher = ImportanceConfig(curvature="fisher")
    one, _ = build_masks(model, weights, MaskRecipe(calib_examples=8, calib_batch_size=8, importance=fisher), tasks,
                         pad)
    two, _ = build_masks(model, weights, MaskRecipe(calib_examples=8, calib_batch_size=4, importance=fisher), tasks,
                         pad)
    check_rows(one, 0.05)
    assert all(torch.equal(one[n], two[n]) for n in one)
    with pytest.raises(ZolmError, match="task sst2: the fisher curvature needs >= 2 calibration examples, got 1"):
        build_masks(model, weights, MaskRecipe(calib_examples=1, calib_batch_size=8, importance=fisher), tasks, pad)
    masks, _ = build_masks(model, weights, MaskRecipe(calib_examples=8, calib_batch_size=8,
                                                      importance=ImportanceConfig(curvature="activation")), tasks, pad)
    check_rows(masks, 0.05)
