"""Multi-task masks: exactly k per row, deterministic ties, baselines, overlap statistics, save / load."""

import json

import pytest
import torch

from zolm.errors import ZolmError
from zolm.masks.multitask import (
    MASK_FILE,
    META_FILE,
    check_rows,
    load_masks,
    magnitude_mask,
    overlap_stats,
    random_mask,
    row_k,
    save_masks,
    topk_row_mask,
)


@pytest.mark.parametrize("shape", [(5, 100), (16, 200), (3, 1536)])
@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.2, 0.5, 1.0])
def test_topk_keeps_exactly_k_per_row_and_the_largest(shape, ratio):
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, shape, generator=g).float()  # heavy ties
    mask = topk_row_mask(score, ratio)
    k = round(ratio * shape[1])
    assert mask.dtype == torch.bool and bool((mask.sum(-1) == k).all())
    lowest_kept = torch.where(mask, score, torch.inf).amin(-1)
    highest_dropped = torch.where(~mask, score, -torch.inf).amax(-1)
    assert bool((lowest_kept >= highest_dropped).all())
    check_rows({"w": mask}, ratio)


def test_ties_go_to_the_lower_column_and_masks_are_reproducible():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 2.0]])
    assert topk_row_mask(score, 0.5).tolist() == [[True, True, False, False], [False, True, True, False]]
    s = torch.randn(64, 128)
    assert torch.equal(topk_row_mask(s, 0.1), topk_row_mask(s.clone(), 0.1))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_ratios_are_one_line_errors(ratio):
    with pytest.raises(ZolmError, match=r"^mask_ratio must be in \(0, 1\], got"):
        topk_row_mask(torch.rand(2, 10), ratio)


def test_a_ratio_that_keeps_nothing_is_an_error():
    assert row_k(576, 0.05) == 29 and row_k(1536, 0.05) == 77
    with pytest.raises(ZolmError, match="mask_ratio 0.01 keeps no weight of rows of length 32"):
        topk_row_mask(torch.rand(4, 32), 0.01)
    with pytest.raises(ZolmError, match="NaN or infinity"):
        topk_row_mask(torch.tensor([[1.0, float("nan")]]), 0.5)


def test_random_and_magnitude_baselines():
    a, b = random_mask((32, 100), 0.1, seed=1), random_mask((32, 100), 0.1, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, random_mask((32, 100), 0.1, seed=2))
    check_rows({"r": a}, 0.1)
    w = torch.randn(8, 50)
    m = magnitude_mask(w, 0.2)
    check_rows({"m": m}, 0.2)
    assert bool((w.abs()[m].view(8, 10).amin(-1) >= w.abs().masked_fill(m, 0).amax(-1)).all())


def test_check_rows_catches_a_wrong_count():
    m = topk_row_mask(torch.rand(4, 10), 0.3)
    m[1, :] = True
    with pytest.raises(ZolmError, match="rows with 3..10 entries, not 3"):
        check_rows({"w": m}, 0.3)


def test_overlap_statistics():
    g = torch.Generator().manual_seed(0)
    a = topk_row_mask(torch.rand(50, 40, generator=g), 0.25)
    far = topk_row_mask(-torch.rand(50, 40, generator=g) - 10 * a.float(), 0.25)  # avoids a: disjoint
    stats = overlap_stats({"t1": {"w": a}, "t2": {"w": a.clone()}, "t3": {"w": far}}, {"w": a}, 0.25)
    assert stats["pairwise"] == {"t1|t2": 1.0, "t1|t3": 0.0, "t2|t3": 0.0}
    assert stats["in_final"] == {"t1": 1.0, "t2": 1.0, "t3": 0.0}
    assert stats["final_votes"] == [0.0, 0.0, 1.0, 0.0] and stats["chance"] == 0.25
    from zolm.zo.rng import pack_mask

    packed = overlap_stats({"t1": {"w": pack_mask(a)}, "t2": {"w": pack_mask(far)}}, {"w": a}, 0.25)
    assert packed["pairwise"] == {"t1|t2": 0.0}


def test_save_and_load_round_trip_bit_packed(tmp_path):
    masks = {"a.weight": topk_row_mask(torch.rand(33, 70), 0.1), "b.weight": topk_row_mask(torch.rand(7, 9), 0.5)}
    save_masks(tmp_path, masks, {"recipe": {"kind": "importance"}, "note": 1})
    loaded, meta = load_masks(tmp_path)
    assert set(loaded) == set(masks) and all(torch.equal(loaded[k], masks[k]) for k in masks)
    assert meta["recipe"] == {"kind": "importance"} and meta["shapes"]["a.weight"] == [33, 70]
    # 1 bit per coordinate (+ the safetensors header), 1/32 of the float32 weights it covers
    assert (tmp_path / MASK_FILE).stat().st_size < (33 * 70 + 7 * 9) / 8 + 400
    meta["counts"]["a.weight"] += 1
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ZolmError, match="does not match its recorded count"):
        load_masks(tmp_path)
    with pytest.raises(ZolmError, match="no masks in"):
        load_masks(tmp_path / "nowhere")
