"""The suite's MONAI CumulativeIterationMetric: buffering over batches, mean aggregation, per-image tables."""

from __future__ import annotations

import pytest
import torch

from ambiseg_monai.metrics import METRIC_NAMES, AmbiguousSegmentationMetrics
from test_metrics_functional import CASES  # hand-computed cases (tests/ is on sys.path)


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


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_single_metric_accumulates_and_aggregates(name):
    (p1, r1, m1), (p2, r2, m2), expected = two_batches()
    metric = AmbiguousSegmentationMetrics(metrics=[name])
    first = metric(p1, r1, rater_mask=m1)
    assert list(first) == [name] and first[name].shape == (2,)
    metric(p2, r2, rater_mask=m2)
    want = torch.tensor([e[name] for e in expected], dtype=torch.float64)
    assert torch.allclose(metric.per_image()[name], want, atol=1e-7)
    assert metric.per_image()[name].dtype == torch.float64
    assert metric.aggregate()[name] == pytest.approx(want.mean().item(), abs=1e-7)
    metric.reset()
    with pytest.raises(ValueError, match="nothing buffered"):
        metric.aggregate()


def test_soft_dice_takes_a_soft_map():
    preds, raters, _ = CASES["basic"]
    metric = AmbiguousSegmentationMetrics(metrics=["soft_dice"], thresholds=(0.5,))
    metric(preds, raters, pred_soft=preds.float().mean(1))  # B x H x W soft map
    metric(preds, raters)  # default: the mean of the samples
    # τ = 0.5: pred [1,1,1,0] vs GT [1,1,0,0] -> (4 + s) / (5 + s)
    want = torch.full((2,), (4 + 1e-6) / (5 + 1e-6), dtype=torch.float64)
    assert torch.allclose(metric.per_image()["soft_dice"], want)


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
    with pytest.raises(ValueError, match="unknown names"):
        AmbiguousSegmentationMetrics(metrics=["ged", "nope"])
    with pytest.raises(ValueError, match="unknown names"):
        AmbiguousSegmentationMetrics(metrics=[])
    with pytest.raises(TypeError, match="unknown options"):
        AmbiguousSegmentationMetrics(metrics=["ged"], unbaised=True)
    preds, _, _ = CASES["basic"]
    with pytest.raises(ValueError, match="rater stack y"):
        AmbiguousSegmentationMetrics(metrics=["ged"])(preds)
    with pytest.raises(ValueError, match="batch-first tensors"):
        AmbiguousSegmentationMetrics()([preds[0]], preds)
