"""The counting kernels under the metric suite: the int8 and float Gram products, the per-pixel byte sums and
S_NCC's per-rater histograms equal direct counts on random masks (odd sizes, empty and full masks, padding
raters, more than 8 raters and more than 255 masks)."""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.metrics import pairwise
from ambiseg_monai.metrics.ncc import rater_level_histogram
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps, pixel_counts


def random_masks(seed: int, batch: int, count: int, height: int, width: int) -> torch.Tensor:
    """B x K x H x W bool masks with a per-mask density (some masks empty, some full)."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(batch, count, 1, 1, generator=g) * 1.4 - 0.2
    masks = torch.rand(batch, count, height, width, generator=g) < density
    masks[0, 0] = False
    masks[-1, -1] = True
    return masks


def direct_gram(preds: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """B x K x K intersections |A ∩ B| counted mask pair by mask pair."""
    rows = torch.cat([preds, raters], 1).flatten(2)
    return (rows[:, :, None, :] & rows[:, None, :, :]).sum(-1)


# odd sizes (not multiples of 8 or 64), a single pixel, a square
SHAPES = [(1, 1), (7, 9), (13, 5), (16, 16), (31, 33)]


@pytest.mark.parametrize("height, width", SHAPES)
def test_gram_products_equal_direct_counts(height, width):
    preds, raters = random_masks(0, 3, 5, height, width), random_masks(1, 3, 3, height, width)
    expected = direct_gram(preds, raters)
    flat_preds, flat_raters = preds.flatten(2), raters.flatten(2)
    assert pairwise._int8_matmul_works()  # the CPU build used in CI has the int8 kernel
    if height * width > 1:  # torch's CPU _int_mm is wrong for a reduction length of 1: from_masks avoids it
        assert torch.equal(pairwise._gram_int8(flat_preds, flat_raters).long(), expected)
    assert torch.equal(pairwise._gram_float(flat_preds, flat_raters).long(), expected)
    overlaps = MaskSetOverlaps.from_masks(preds, raters, torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(overlaps.pred_rater.long(), expected[:, :5, 5:])
    assert torch.equal(overlaps.rater_area.long(), torch.diagonal(expected, dim1=1, dim2=2)[:, 5:])


@pytest.mark.parametrize("height, width", SHAPES)
def test_pixel_counts_count_predictions_and_real_raters_only(height, width):
    preds, raters = random_masks(2, 4, 6, height, width), random_masks(3, 4, 3, height, width)
    rater_mask = torch.tensor([[True, True, True], [True, False, True], [True, False, False], [False, True, True]])
    pred_count, rater_votes = pixel_counts(preds.flatten(2), raters.flatten(2), rater_mask)
    assert pred_count.dtype == rater_votes.dtype == torch.uint8
    assert torch.equal(pred_count.long(), preds.flatten(2).sum(1))
    # a padding channel holding foreground (not the datasets' convention, but allowed) must not vote
    assert raters[1, 1].any()
    assert torch.equal(rater_votes.long(), (raters & rater_mask[:, :, None, None]).flatten(2).sum(1))


def test_pixel_counts_widen_from_256_masks_on():
    preds = torch.ones(1, 300, 2, 3, dtype=torch.bool)
    raters = torch.ones(1, 2, 2, 3, dtype=torch.bool)
    pred_count, rater_votes = pixel_counts(preds.flatten(2), raters.flatten(2), torch.tensor([[True, False]]))
    assert pred_count.dtype == torch.int32 and bool((pred_count == 300).all())
    assert bool((rater_votes == 1).all())


def test_overlaps_of_empty_masks_are_zero():
    preds = torch.zeros(2, 3, 5, 7, dtype=torch.bool)
    raters = torch.zeros(2, 2, 5, 7, dtype=torch.bool)
    overlaps = MaskSetOverlaps.from_masks(preds, raters, torch.ones(2, 2, dtype=torch.bool))
    for counts in (overlaps.pred_area, overlaps.rater_area, overlaps.pred_pred, overlaps.pred_rater):
        assert not counts.any()
    assert not overlaps.pred_count.any() and not overlaps.rater_votes.any()


@pytest.mark.parametrize("num_raters", [1, 3, 8, 11])  # one pattern group, a full one, two groups
def test_rater_level_histogram_equals_direct_counts(num_raters):
    num_samples = 6
    preds = random_masks(4, 3, num_samples, 9, 7)
    raters = random_masks(5, 3, num_raters, 9, 7).flatten(2)
    pred_count, _ = pixel_counts(preds.flatten(2), raters, torch.ones(3, num_raters, dtype=torch.bool))
    on_rater, per_level = rater_level_histogram(pred_count, num_samples + 1, raters)
    level_onehot = pred_count.long()[:, :, None] == torch.arange(num_samples + 1)  # B x P x levels
    expected_on = torch.einsum("bmp,bpk->bmk", raters.double(), level_onehot.double())
    assert torch.equal(on_rater, expected_on)
    assert torch.equal(per_level, level_onehot.sum(1).double())
    assert on_rater.dtype == per_level.dtype == torch.float64
