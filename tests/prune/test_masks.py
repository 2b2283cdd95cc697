"""Masks: exact counts per comparison group, the vectorised N:M mask against a loop, N:M parsing."""

import pytest
import torch

from zolm.errors import ZolmError
from zolm.prune.masks import (
    apply_mask_,
    layer_mask,
    make_mask,
    nm_mask,
    nm_violations,
    parse_nm,
    row_mask,
    row_sparsity,
    sparsity,
)


def score(rows=12, cols=40, seed=0):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("s", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99])
def test_row_mask_prunes_exactly_round_s_in_per_row(s):
    keep = row_mask(score(), s)
    assert torch.all((~keep).sum(1) == round(s * 40))
    ranked = score().argsort(dim=1)[:, : round(s * 40)]  # the lowest scores are the pruned ones
    assert torch.all(~keep.gather(1, ranked))


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_layer_mask_prunes_exactly_round_s_numel_below_a_threshold(s):
    sc = score()
    keep = layer_mask(sc, s)
    k = round(s * sc.numel())
    assert int((~keep).sum()) == k
    if 0 < k < sc.numel():
        assert sc[~keep].max() < sc[keep].min()


def nm_loop(sc, n, m):
    """Reference: a plain loop over rows and groups."""
    keep = torch.ones_like(sc, dtype=torch.bool)
    for r in range(sc.shape[0]):
        for g in range(0, sc.shape[1], m):
            order = sorted(range(m), key=lambda j: sc[r, g + j].item())
            for j in order[: m - n]:
                keep[r, g + j] = False
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_matches_the_loop_and_keeps_n_per_group(n, m):
    sc = score(6, 32, seed=n * 10 + m)
    keep = nm_mask(sc, n, m)
    assert torch.equal(keep, nm_loop(sc, n, m))
    assert torch.all(keep.view(6, -1, m).sum(-1) == n)


def test_apply_mask_writes_positive_zeros_and_sparsity_helpers_agree():
    w = -torch.rand(4, 8) - 0.1  # all negative: multiplying by 0 would leave -0.0
    keep = nm_mask(w.abs(), 2, 4)
    apply_mask_(w, keep)
    assert torch.all(torch.signbit(w[~keep]) == 0)
    assert sparsity(w) == 0.5 and torch.all(row_sparsity(w) == 0.5) and nm_violations(w, 2, 4) == 0
    w[0, :2] = 1.0
    w[0, 2:4] = 1.0
    assert nm_violations(w, 2, 4) == 1


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 4:8 ", (4, 8)), ("1:4", (1, 4))])
def test_parse_nm(text, expected):
    assert parse_nm(text) == expected


@pytest.mark.parametrize("text,message", [
    ("3:2", r"'3:2' needs 0 < N < M"), ("0:4", r"'0:4' needs 0 < N < M"), ("4:4", "needs 0 < N < M"),
    ("2-4", r"must look like 2:4 .*got '2-4'"), ("2:", "must look like 2:4"), ("a:b", "must look like 2:4"),
])
def test_bad_nm_strings_get_one_line_errors(text, message):
    with pytest.raises(ZolmError, match=message):
        parse_nm(text)


def test_nm_needs_a_multiple_of_m_and_unknown_group_is_reported():
    with pytest.raises(ZolmError, match="multiple of 8, got 12"):
        nm_mask(score(2, 12), 4, 8)
    with pytest.raises(ZolmError, match="unknown comparison group 'column'"):
        make_mask(score(), 0.5, None, "column")
