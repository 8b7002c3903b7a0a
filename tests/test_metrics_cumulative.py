"""MONAI CumulativeIterationMetric classes: buffering over batches, mean aggregation, per-image tables."""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.metrics import (
    METRIC_NAMES,
    AmbiguousSegmentationMetrics,
    CollectiveInsightMetric,
    CrossPairDiceMetric,
    CrossPairIoUMetric,
    GeneralizedEnergyDistanceMetric,
    HungarianMatchedIoUMetric,
    SampleDiversityMetric,
    SNCCMetric,
    SoftDiceMetric,
)
from test_metrics_functional import CASES  # noqa: E402  (hand-computed cases, tests/ is on sys.path)


def two_batches():
    """Batch 1: basic + both empty (2 raters); batch 2: only-preds-empty + single rater padded to 2."""
    first = [CASES["basic"], CASES["both_empty"]]
    preds1 = torch.cat([c[0] for c in first])
    raters1 = torch.cat([c[1] for c in first])
    single_preds, single_raters, _ = CASES["single_rater"]
    preds2 = torch.cat([CASES["only_preds_empty"][0], single_preds])
    raters2 = torch.cat([CASES["only_preds_empty"][1], torch.cat([single_raters, torch.zeros_like(single_raters)], 1)])
    mask2 = torch.tensor([[True, True], [True, False]])
    expected = [CASES[n][2] for n in ("basic", "both_empty", "only_preds_empty", "single_rater")]
    return (preds1, raters1, None), (preds2, raters2, mask2), expected


METRIC_CLASSES = {
    "ged": GeneralizedEnergyDistanceMetric,
    "sample_diversity": SampleDiversityMetric,
    "ci": CollectiveInsightMetric,
    "combined_sensitivity": lambda: CollectiveInsightMetric(component="combined_sensitivity"),
    "max_dice_matching": lambda: CollectiveInsightMetric(component="max_dice_matching"),
    "diversity_agreement": lambda: CollectiveInsightMetric(component="diversity_agreement"),
    "soft_dice": SoftDiceMetric,
    "hm_iou": HungarianMatchedIoUMetric,
    "cross_pair_dice": CrossPairDiceMetric,
    "cross_pair_iou": CrossPairIoUMetric,
    "s_ncc": SNCCMetric,
}


@pytest.mark.parametrize("name", list(METRIC_CLASSES))
def test_metric_class_accumulates_and_aggregates(name):
    (p1, r1, m1), (p2, r2, m2), expected = two_batches()
    metric = METRIC_CLASSES[name]()
    first = metric(p1, r1, rater_mask=m1)
    assert first.shape == (2, 1)
    metric(p2, r2, rater_mask=m2)
    want = torch.tensor([e[name] for e in expected], dtype=torch.float64)
    assert torch.allclose(metric.per_image(), want, atol=1e-7)
    assert metric.aggregate().item() == pytest.approx(want.mean().item(), abs=1e-7)
    assert metric.aggregate().dtype == torch.float64
    assert metric.aggregate("none").shape == (4, 1)
    metric.reset()
    with pytest.raises(ValueError, match="nothing to aggregate"):
        metric.aggregate()


def test_soft_dice_metric_takes_a_one_channel_soft_map():
    preds, raters, expected = CASES["basic"]
    metric = SoftDiceMetric(thresholds=(0.5,))
    metric(preds.mean(1, keepdim=True), raters)  # B x 1 x H x W soft map
    metric(preds, raters)  # B x N x H x W samples: mean taken
    # τ = 0.5: pred [1,1,1,0] vs GT [1,1,0,0] -> (4 + s) / (5 + s)
    assert torch.allclose(metric.per_image(), torch.full((2,), (4 + 1e-6) / (5 + 1e-6), dtype=torch.float64))


def test_suite_metric_returns_dicts_and_tables():
    (p1, r1, m1), (p2, r2, m2), expected = two_batches()
    suite = AmbiguousSegmentationMetrics()
    out = suite(p1, r1, rater_mask=m1)
    assert list(out) == list(METRIC_NAMES) and out["ged"].shape == (2,)
    suite(p2, r2, rater_mask=m2)
    table = suite.per_image()
    means = suite.aggregate()
    for name in METRIC_NAMES:
        want = torch.tensor([e[name] for e in expected], dtype=torch.float64)
        assert torch.allclose(table[name], want, atol=1e-7), name
        assert means[name] == pytest.approx(want.mean().item(), abs=1e-7), name


def test_suite_metric_options_and_subset():
    preds, raters, _ = CASES["basic"]
    suite = AmbiguousSegmentationMetrics(metrics=["ci", "ged"], harmonic=True, unbiased=True)
    out = suite(preds, raters)
    assert list(out) == ["ci", "ged"]
    assert out["ci"].item() == pytest.approx(165 / 201)
    assert out["ged"].item() == pytest.approx(13 / 12 - 2 / 3 - 1 / 2)
    assert list(suite.aggregate()) == ["ci", "ged"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="component"):
        CollectiveInsightMetric(component="dice")
    with pytest.raises(ValueError, match="unknown names"):
        AmbiguousSegmentationMetrics(metrics=["ged", "nope"])
    preds, _, _ = CASES["basic"]
    with pytest.raises(ValueError, match="rater stack y"):
        GeneralizedEnergyDistanceMetric()(preds)
    # sample diversity needs no raters
    assert SampleDiversityMetric()(preds).shape == (1, 1)
