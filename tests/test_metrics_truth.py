"""Hand-computed cases for the metrics against a known finite rater distribution (metrics/truth.py)."""

import pytest
import torch

from ambiseg_monai.metrics import (
    assign_modes,
    empty_fraction,
    isolated_pixel_fraction,
    region_inclusion_frequency,
    generalized_energy_distance,
    generalized_energy_distance_to_truth,
    mode_frequency_error,
    sampled_mode_frequencies,
)


def _masks(*rows):
    """Masks of 1 x 4 pixels from lists of 0/1 -> K x 1 x 4."""
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), 1, 4)


EMPTY = [0, 0, 0, 0]
CORE = [1, 1, 0, 0]
LOBE = [1, 1, 1, 1]  # core + lobe: IoU(CORE, LOBE) = 2/4


def test_ged_to_truth_hand_computed():
    modes = _masks(CORE, LOBE)[None]  # 1 x 2 x 1 x 4
    p = torch.tensor([[0.25, 0.75]])
    preds = _masks(CORE, CORE)[None]
    # cross: 0.25 * 0 + 0.75 * 0.5 = 0.375; preds term 0; truth term 2 * 0.25 * 0.75 * 0.5 = 0.1875
    ged = generalized_energy_distance_to_truth(preds, modes, p)
    assert ged.dtype == torch.float64
    assert ged.item() == pytest.approx(2 * 0.375 - 0.0 - 0.1875)


def test_ged_to_truth_matches_sample_ged_when_samples_follow_the_probabilities():
    modes = _masks(EMPTY, CORE, LOBE)[None]
    p = torch.tensor([[0.25, 0.25, 0.5]])
    preds = _masks(EMPTY, CORE, LOBE, LOBE)[None]  # frequencies exactly p
    expected = generalized_energy_distance(preds, preds)  # truth as raters with the same frequencies
    assert generalized_energy_distance_to_truth(preds, modes, p).item() == pytest.approx(expected.item())
    assert expected.item() == pytest.approx(0.0)


def test_padded_modes_are_ignored():
    modes = _masks(CORE, LOBE, EMPTY)[None]
    mask = torch.tensor([[True, True, False]])
    preds = _masks(LOBE)[None]
    padded = generalized_energy_distance_to_truth(preds, modes, torch.tensor([[0.5, 0.5, 0.0]]), mode_mask=mask)
    plain = generalized_energy_distance_to_truth(preds, modes[:, :2], torch.tensor([[0.5, 0.5]]))
    assert padded.item() == pytest.approx(plain.item())
    # cross 0.5 * 0.5 + 0.5 * 0 = 0.25; truth term 2 * 0.25 * 0.5 = 0.25 -> 0.5 - 0 - 0.25
    assert plain.item() == pytest.approx(0.25)
    freq = sampled_mode_frequencies(preds, modes, mode_mask=mask)
    assert freq.tolist() == [[0.0, 1.0, 0.0]]


def test_mode_frequencies_and_errors():
    modes = _masks(EMPTY, CORE, LOBE)[None]
    p = torch.tensor([[0.2, 0.3, 0.5]])
    # an empty sample, a core, a core with one extra pixel (IoU 2/3 with CORE, 3/4 with LOBE -> LOBE),
    # and a blob overlapping nothing in CORE but half of LOBE's pixels -> LOBE
    preds = _masks(EMPTY, CORE, [1, 1, 1, 0], [0, 0, 1, 1])[None]
    freq = sampled_mode_frequencies(preds, modes)
    assert freq.tolist() == [[0.25, 0.25, 0.5]]
    error = mode_frequency_error(preds, modes, p)
    assert error[0].tolist() == pytest.approx([0.05, 0.05, 0.0])


def test_unmatched_sample_counts_for_no_mode():
    modes = _masks(CORE)[None]
    preds = _masks([0, 0, 1, 1], CORE)[None]  # first sample: IoU 0 with the only mode
    assert sampled_mode_frequencies(preds, modes).tolist() == [[0.5]]
    assert mode_frequency_error(preds, modes, torch.tensor([[1.0]])).tolist() == [[0.5]]


def test_empty_fraction_plain_and_weighted():
    masks = _masks(EMPTY, CORE, EMPTY, LOBE)[None]
    assert empty_fraction(masks).tolist() == [0.5]
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert empty_fraction(masks, weights).item() == pytest.approx(0.4)


def test_bad_probabilities_are_rejected():
    modes = _masks(CORE, LOBE)[None]
    preds = _masks(CORE)[None]
    with pytest.raises(ValueError, match="sum to 1"):
        generalized_energy_distance_to_truth(preds, modes, torch.tensor([[0.5, 0.6]]))
    with pytest.raises(ValueError, match="B x K"):
        mode_frequency_error(preds, modes, torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="padded modes"):
        generalized_energy_distance_to_truth(
            preds, modes, torch.tensor([[0.5, 0.5]]), mode_mask=torch.tensor([[True, False]])
        )
    with pytest.raises(ValueError, match="weights"):
        empty_fraction(modes, torch.tensor([[-1.0, 2.0]]))


def test_region_inclusion_frequency_counts_non_empty_samples_only():
    # regions on 1 x 4 pixels: lobe A = pixels 2..3, lobe B = pixel 0
    regions = _masks([0, 0, 1, 1], [1, 0, 0, 0])[None]
    # samples: empty (ignored), covers all of A, covers half of A (not more than 0.5) and B, covers B only
    preds = _masks(EMPTY, [0, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 0])[None]
    freq = region_inclusion_frequency(preds, regions)
    assert freq.dtype == torch.float64
    assert freq.tolist() == [[pytest.approx(1 / 3), pytest.approx(2 / 3)]]
    # a lower coverage threshold counts the half-covered lobe A
    assert region_inclusion_frequency(preds, regions, min_coverage=0.4)[0, 0].item() == pytest.approx(2 / 3)
    # padded regions read 0; all-empty samples give 0
    masked = region_inclusion_frequency(preds, regions, region_mask=torch.tensor([[True, False]]))
    assert masked[0, 1].item() == 0.0
    assert region_inclusion_frequency(_masks(EMPTY, EMPTY)[None], regions).tolist() == [[0.0, 0.0]]


def test_region_inclusion_frequency_rejects_empty_real_regions():
    with pytest.raises(ValueError, match="empty"):
        region_inclusion_frequency(_masks(CORE)[None], _masks(EMPTY)[None])


def test_isolated_pixel_fraction_hand_computed():
    masks = torch.zeros(1, 2, 5, 5, dtype=torch.bool)
    masks[0, 0, 1:3, 1:3] = True  # a 2 x 2 blob: no isolated pixel
    masks[0, 0, 4, 4] = True  # one speck
    masks[0, 1, 0, 4] = True  # another speck (corner, padding counts as background)
    masks[0, 1, 2, 0] = masks[0, 1, 3, 1] = True  # diagonal neighbours are not isolated
    # foreground 4 + 1 + 1 + 2 = 8 pixels, 2 isolated
    assert isolated_pixel_fraction(masks).tolist() == [0.25]
    assert isolated_pixel_fraction(torch.zeros(2, 1, 3, 3)).tolist() == [0.0, 0.0]


def test_assign_modes_picks_the_best_iou_mode_and_minus_one_for_no_match():
    modes = torch.zeros(1, 3, 4, 4)
    modes[0, 1, :2, :2] = 1  # a 2 x 2 square
    modes[0, 2, :2, :] = 1  # the top half (contains the square)
    preds = torch.zeros(1, 4, 4, 4)
    preds[0, 1, :2, :2] = 1  # the square: IoU 1 with mode 1, 0.5 with mode 2
    preds[0, 2, :2, :3] = 1  # IoU 4/6 with mode 1, 6/8 with mode 2
    preds[0, 3, 3, 3] = 1  # overlaps nothing
    assert assign_modes(preds, modes).tolist() == [[0, 1, 2, -1]]  # empty sample -> the empty mode
    # a padded mode never receives a sample; a stricter min_iou leaves the weaker match unassigned
    assert assign_modes(preds, modes, torch.tensor([[False, True, True]])).tolist() == [[-1, 1, 2, -1]]
    assert assign_modes(preds, modes, min_iou=0.7).tolist() == [[0, 1, 2, -1]]
    assert assign_modes(preds, modes, min_iou=0.8).tolist() == [[0, 1, -1, -1]]
