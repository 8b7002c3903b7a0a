"""Hand-computed values of every metric, every empty-mask case and every option (ambiseg_monai.metrics).

All cases use 1 x 4 pixel images so the numbers can be checked on paper:
    p1 = [1,1,0,0], p2 = [0,1,1,0] (predictions), y1 = [1,1,0,0], y2 = [1,0,0,0] (raters)
    IoU(p1,y1)=1, IoU(p1,y2)=1/2, IoU(p2,y1)=1/3, IoU(p2,y2)=0, IoU(p1,p2)=1/3, IoU(y1,y2)=1/2
    Dice(p1,y1)=1, Dice(p1,y2)=2/3, Dice(p2,y1)=1/2, Dice(p2,y2)=0
    pixel variance of p1-p2 = [1,0,-1,0]: 1/2;  of y1-y2 = [0,1,0,0]: 1/4 - 1/16 = 3/16
"""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.metrics import (
    CONSENSUS_PAPER_THRESHOLDS,
    METRIC_NAMES,
    ambiguous_segmentation_metrics,
    collective_insight,
    cross_pair_dice,
    cross_pair_iou,
    generalized_energy_distance,
    hungarian_matched_iou,
    s_ncc,
    sample_diversity,
    soft_dice,
)

S = 1e-6  # soft Dice smoothing
P1, P2, Y1, Y2, EMPTY = [1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]


def stack(*masks: list[int]) -> torch.Tensor:
    """1 x K x 1 x 4 float stack of the given masks."""
    return torch.tensor([masks], dtype=torch.float32)[:, :, None, :]


def value(x: torch.Tensor) -> float:
    assert x.shape == (1,) and x.dtype == torch.float64
    return float(x[0])


def ci_printed(s: float, d: float, a: float) -> float:
    return 3 * s * d * a / (s + d + a)


# name -> (preds, raters, expected values); each expected value is derived in the comment next to it.
CASES = {
    "basic": (
        stack(P1, P2),
        stack(Y1, Y2),
        {
            # cross d = (0 + 1/2 + 2/3 + 1)/4 = 13/24; preds d = (2/3 + 2/3)/4 = 1/3; raters d = (1/2 + 1/2)/4 = 1/4
            "ged": 2 * 13 / 24 - 1 / 3 - 1 / 4,
            "sample_diversity": 1 / 3,
            "combined_sensitivity": 1.0,  # union preds [1,1,1,0] covers union raters [1,1,0,0]
            "dmax": (1 + 2 / 3) / 2,
            "diversity_agreement": 1 - (abs(3 / 16 - 1 / 2) + abs(3 / 16 - 1 / 2)) / 2,
            "ci": 15 / 22,
            "soft_dice": (5 * (4 + S) / (5 + S) + 4 * S / (2 + S)) / 9,  # soft pred [.5,1,.5,0], soft GT [1,.5,0,0]
            "hm_iou": 0.5,  # best assignment p1-y1 (1) + p2-y2 (0)
            "cross_pair_dice": (1 + 2 / 3 + 1 / 2 + 0) / 4,
            "cross_pair_iou": (1 + 1 / 2 + 1 / 3 + 0) / 4,
            # E_ss ∝ [1,0,1,0]; E_sy1 ∝ [1,0,1,0] (NCC 1); E_sy2 ∝ [1,2,1,0] (NCC 0)
            "s_ncc": 0.5,
        },
    ),
    "both_empty": (
        stack(EMPTY, EMPTY),
        stack(EMPTY, EMPTY),
        {
            "ged": 0.0,
            "sample_diversity": 0.0,
            "combined_sensitivity": 1.0,
            "dmax": 1.0,
            "diversity_agreement": 1.0,
            "ci": 1.0,
            "soft_dice": 1.0,
            "hm_iou": 1.0,
            "cross_pair_dice": 1.0,
            "cross_pair_iou": 1.0,
            "s_ncc": 1.0,  # both cross-entropy maps constant
        },
    ),
    "only_gt_empty": (
        stack(P1, P2),
        stack(EMPTY, EMPTY),
        {
            "ged": 2 * 1 - 1 / 3 - 0,
            "sample_diversity": 1 / 3,
            "combined_sensitivity": 1.0,  # empty GT union
            "dmax": 0.0,
            "diversity_agreement": 1 - (1 / 2 + 1 / 2) / 2,
            "ci": 0.0,
            "soft_dice": (5 * S / (3 + S) + 4 * S / (1 + S)) / 9,
            "hm_iou": 0.0,
            "cross_pair_dice": 0.0,
            "cross_pair_iou": 0.0,
            "s_ncc": 0.0,  # E_sy ∝ [1,2,1,0] against E_ss ∝ [1,0,1,0]
        },
    ),
    "only_preds_empty": (
        stack(EMPTY, EMPTY),
        stack(Y1, Y2),
        {
            "ged": 2 * 1 - 0 - 1 / 4,
            "sample_diversity": 0.0,
            "combined_sensitivity": 0.0,
            "dmax": 0.0,
            "diversity_agreement": 1 - (3 / 16 + 3 / 16) / 2,
            "ci": 0.0,
            "soft_dice": (5 * S / (2 + S) + 4 * S / (1 + S)) / 9,
            "hm_iou": 0.0,
            "cross_pair_dice": 0.0,
            "cross_pair_iou": 0.0,
            "s_ncc": 0.0,  # E_ss constant, E_sy not
        },
    ),
    "single_rater": (
        stack(P1, P2),
        stack(Y1),
        {
            "ged": 2 * (0 + 2 / 3) / 2 - 1 / 3 - 0,
            "sample_diversity": 1 / 3,
            "combined_sensitivity": 1.0,
            "dmax": 1.0,
            "diversity_agreement": 1 - (1 / 2 + 1 / 2) / 2,  # one rater: V_min = V_max = 0
            "ci": ci_printed(1.0, 1.0, 0.5),
            "soft_dice": (5 * (4 + S) / (5 + S) + 4 * (2 + S) / (3 + S)) / 9,
            "hm_iou": (1 + 1 / 3) / 2,  # y1 repeated twice: p1-y1 (1), p2-y1 (1/3)
            "cross_pair_dice": (1 + 1 / 2) / 2,
            "cross_pair_iou": (1 + 1 / 3) / 2,
            "s_ncc": 1.0,  # E_sy ∝ [1,0,1,0] = E_ss pattern
        },
    ),
    "single_sample": (
        stack(P1),
        stack(Y1, Y2),
        {
            "ged": 2 * (0 + 1 / 2) / 2 - 0 - 1 / 4,
            "sample_diversity": 0.0,
            "combined_sensitivity": 1.0,
            "dmax": (1 + 2 / 3) / 2,
            "diversity_agreement": 1 - (3 / 16 + 3 / 16) / 2,
            "ci": ci_printed(1.0, 5 / 6, 1 - 3 / 16),
            # soft pred = p1; soft GT [1,.5,0,0]: τ <= .5 -> both [1,1,0,0]; τ > .5 -> [1,1,0,0] vs [1,0,0,0]
            "soft_dice": (5 * 1 + 4 * (2 + S) / (3 + S)) / 9,
            "hm_iou": (1 + 1 / 2) / 2,  # p1 repeated twice, matched to y1 and y2
            "cross_pair_dice": (1 + 2 / 3) / 2,
            "cross_pair_iou": (1 + 1 / 2) / 2,
            "s_ncc": 0.5,  # E_ss constant; E_sy1 constant (NCC 1); E_sy2 not (NCC 0)
        },
    ),
}


def functional_values(preds: torch.Tensor, raters: torch.Tensor) -> dict[str, float]:
    ci = collective_insight(preds, raters)
    return {
        "ged": value(generalized_energy_distance(preds, raters)),
        "sample_diversity": value(sample_diversity(preds)),
        **{k: value(v) for k, v in ci.items()},
        "soft_dice": value(soft_dice(preds.mean(1), raters)),
        "hm_iou": value(hungarian_matched_iou(preds, raters)),
        "cross_pair_dice": value(cross_pair_dice(preds, raters)),
        "cross_pair_iou": value(cross_pair_iou(preds, raters)),
        "s_ncc": value(s_ncc(preds, raters)),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_functional_api_matches_hand_computed_values(case):
    preds, raters, expected = CASES[case]
    got = functional_values(preds, raters)
    assert set(got) == set(METRIC_NAMES)
    for name, want in expected.items():
        assert got[name] == pytest.approx(want, abs=1e-7), f"{case}: {name}"


@pytest.mark.parametrize("case", list(CASES))
def test_suite_matches_hand_computed_values(case):
    preds, raters, expected = CASES[case]
    got = ambiguous_segmentation_metrics(preds.bool(), raters.to(torch.uint8))
    assert list(got) == list(METRIC_NAMES)
    for name, want in expected.items():
        assert value(got[name]) == pytest.approx(want, abs=1e-7), f"{case}: {name}"


def test_unbiased_ged_and_diversity_exclude_self_pairs():
    preds, raters, _ = CASES["basic"]
    # preds d over i != j: 2/3; raters: 1/2
    assert value(generalized_energy_distance(preds, raters, unbiased=True)) == pytest.approx(13 / 12 - 2 / 3 - 1 / 2)
    assert value(sample_diversity(preds, unbiased=True)) == pytest.approx(2 / 3)
    # single rater: no distinct rater pair -> rater term 0 (as in the biased form)
    preds, raters, _ = CASES["single_rater"]
    assert value(generalized_energy_distance(preds, raters, unbiased=True)) == pytest.approx(2 / 3 - 2 / 3 - 0)
    # single sample: no distinct sample pair -> 0
    assert value(sample_diversity(stack(P1), unbiased=True)) == 0.0


def test_collective_insight_options():
    preds, raters, _ = CASES["basic"]
    default = collective_insight(preds, raters)
    self_pairs = collective_insight(preds, raters, include_self_pairs=True)
    # with i = j pairs V_min = 0 in both sets: D_a = 1 - (|3/16 - 1/2| + 0) / 2
    assert value(self_pairs["diversity_agreement"]) == pytest.approx(1 - 5 / 32)
    assert value(default["diversity_agreement"]) == pytest.approx(1 - 5 / 16)
    harmonic = collective_insight(preds, raters, harmonic=True)
    # 3 / (1/1 + 6/5 + 16/11) = 165/201
    assert value(harmonic["ci"]) == pytest.approx(165 / 201)
    assert value(default["ci"]) == pytest.approx(15 / 22)
    # the components do not depend on the combination rule
    for key in ("combined_sensitivity", "dmax", "diversity_agreement"):
        assert value(harmonic[key]) == value(default[key])
    # harmonic mean with a zero component is 0
    zero = collective_insight(*CASES["only_preds_empty"][:2], harmonic=True)
    assert value(zero["ci"]) == 0.0


def test_combined_sensitivity_is_sensitivity_not_precision():
    # prediction union [1,1,1,1] over GT union [1,0,0,0]: sensitivity 1 (precision would be 1/4)
    out = collective_insight(stack([1, 1, 1, 1]), stack([1, 0, 0, 0]))
    assert value(out["combined_sensitivity"]) == 1.0
    # prediction [1,0,0,0] against GT [1,1,1,1]: sensitivity 1/4
    out = collective_insight(stack([1, 0, 0, 0]), stack([1, 1, 1, 1]))
    assert value(out["combined_sensitivity"]) == pytest.approx(0.25)


def test_soft_dice_thresholds_and_soft_map():
    preds, raters, _ = CASES["basic"]
    soft = preds.mean(1)
    got = value(soft_dice(soft, raters, thresholds=CONSENSUS_PAPER_THRESHOLDS))
    assert got == pytest.approx((3 * (4 + S) / (5 + S) + 2 * S / (2 + S)) / 5)
    # one threshold, an arbitrary soft map: [0.7,0.2,0,0] >= 0.7 -> [1,0,0,0]; GT (y1+y2)/2 >= 0.7 -> [1,0,0,0]
    assert value(soft_dice(torch.tensor([[[0.7, 0.2, 0.0, 0.0]]]), raters, thresholds=(0.7,))) == pytest.approx(1.0)
    # float32 0.7 is below float64 0.7; it must still count as reaching the threshold 0.7
    soft32 = torch.tensor([[[0.7, 0.0, 0.0, 0.0]]], dtype=torch.float32)
    assert value(soft_dice(soft32, raters, thresholds=(0.7,))) == pytest.approx(1.0)
    # threshold order and duplicates do not matter beyond their multiplicity
    a = soft_dice(soft, raters, thresholds=(0.9, 0.1, 0.5))
    b = soft_dice(soft, raters, thresholds=(0.1, 0.5, 0.9))
    assert torch.equal(a, b)


def test_s_ncc_accepts_probabilities():
    preds, raters, _ = CASES["basic"]
    assert value(s_ncc(preds.bool(), raters)) == pytest.approx(0.5, abs=1e-7)
    probs = torch.tensor([[[[0.9, 0.6, 0.2, 0.1]], [[0.8, 0.7, 0.3, 0.1]]]])
    got = value(s_ncc(probs, raters))
    assert -1.0 <= got <= 1.0
    # identical probabilistic samples still have a non-constant E_ss (it is their entropy map)
    same = probs[:, :1].expand(1, 3, 1, 4)
    assert torch.isfinite(s_ncc(same, raters)).all()


def test_rater_mask_ignores_padding_channels():
    preds, raters, expected = CASES["single_rater"]
    padded = torch.cat([raters, stack(EMPTY)], dim=1)  # 1 real rater + 1 padding channel
    mask = torch.tensor([[True, False]])
    got = ambiguous_segmentation_metrics(preds, padded, rater_mask=mask)
    for name, want in expected.items():
        assert value(got[name]) == pytest.approx(want, abs=1e-7), name
    # without the mask the padding channel would count as an (empty) rater and change the result
    unmasked = ambiguous_segmentation_metrics(preds, padded)
    assert value(unmasked["dmax"]) != pytest.approx(expected["dmax"])
    # every functional entry point honours the mask
    assert value(generalized_energy_distance(preds, padded, rater_mask=mask)) == pytest.approx(expected["ged"])
    assert value(hungarian_matched_iou(preds, padded, rater_mask=mask)) == pytest.approx(expected["hm_iou"])
    assert value(soft_dice(preds.mean(1), padded, rater_mask=mask)) == pytest.approx(expected["soft_dice"])
    assert value(s_ncc(preds, padded, rater_mask=mask)) == pytest.approx(expected["s_ncc"], abs=1e-7)
    ci = collective_insight(preds, padded, rater_mask=mask)
    assert value(ci["ci"]) == pytest.approx(expected["ci"])


def test_batch_of_cases_gives_per_image_values_in_order():
    names = ["basic", "both_empty", "only_preds_empty"]
    preds = torch.cat([CASES[n][0] for n in names])
    raters = torch.cat([CASES[n][1] for n in names])
    got = ambiguous_segmentation_metrics(preds, raters, images_per_chunk=2)
    for name in METRIC_NAMES:
        assert got[name].shape == (3,)
        want = torch.tensor([CASES[n][2][name] for n in names], dtype=torch.float64)
        assert torch.allclose(got[name], want, atol=1e-7), name


def test_hm_iou_uses_least_common_multiple():
    # N = 3, M = 2 -> L = 6: rows [y1,y1,y1,y1,y2,y2] (each prediction twice), cols [y1,y1,y1,y2,y2,y2].
    # Best matching: 3 x IoU(y1,y1) = 1, 2 x IoU(y2,y2) = 1, the remaining y1 row with a y2 column: 1/2.
    preds = stack(Y1, Y1, Y2)
    raters = stack(Y1, Y2)
    assert value(hungarian_matched_iou(preds, raters)) == pytest.approx((5 + 0.5) / 6)


@pytest.mark.parametrize(
    "preds, raters, kwargs, message",
    [
        (torch.zeros(2, 1, 4), torch.zeros(2, 1, 1, 4), {}, "preds: expected shape B x K x H x W"),
        (torch.full((1, 2, 1, 4), 0.5), stack(Y1), {}, "preds: binary masks must hold only 0 and 1"),
        (stack(P1), torch.full((1, 1, 1, 4), float("nan")), {}, "raters: contains NaN"),
        (stack(P1), torch.zeros(2, 1, 1, 4), {}, "different batch sizes"),
        (stack(P1), torch.zeros(1, 1, 1, 5), {}, "different image sizes"),
        (stack(P1), stack(Y1, Y2), {"rater_mask": torch.ones(1, 3, dtype=torch.bool)}, "rater_mask: expected shape"),
        (stack(P1), stack(Y1, Y2), {"rater_mask": torch.zeros(1, 2, dtype=torch.bool)}, "have no real rater"),
    ],
)
def test_bad_inputs_fail_with_clear_messages(preds, raters, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generalized_energy_distance(preds, raters, **kwargs)


def test_bad_options_fail_with_clear_messages():
    preds, raters, _ = CASES["basic"]
    with pytest.raises(ValueError, match="thresholds"):
        soft_dice(preds.mean(1), raters, thresholds=(0.0, 0.5))
    with pytest.raises(ValueError, match="pred_soft: values must lie in"):
        soft_dice(preds.mean(1) * 2, raters)
    with pytest.raises(ValueError, match="pred_soft: expected shape B x H x W"):
        soft_dice(preds, raters)
    with pytest.raises(ValueError, match="unknown names"):
        ambiguous_segmentation_metrics(preds, raters, metrics=["ged", "dice"])
    with pytest.raises(ValueError, match="preds_or_probs: values must lie in"):
        s_ncc(preds * 3, raters)
    with pytest.raises(TypeError, match="preds: expected a torch.Tensor"):
        sample_diversity(preds.numpy())
