"""The vectorised metrics agree with the per-pair NumPy loop reference (benchmarks/reference_metrics.py)
to 1e-6 on random inputs, including empty masks, padded rater stacks and every option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# The repository root is on sys.path (pytest.ini: pythonpath = .): the loop reference is imported as
# benchmarks.reference_metrics rather than by putting benchmarks/ itself on the path.
from benchmarks import reference_metrics as ref
from ambiseg_monai import metrics
from ambiseg_monai.metrics import (
    CONSENSUS_PAPER_THRESHOLDS,
    METRIC_NAMES,
    ambiguous_segmentation_metrics,
    collective_insight,
    generalized_energy_distance,
    s_ncc,
    sample_diversity,
    soft_dice,
)
from ambiseg_monai.transforms import relative_area_filter

TOL = 1e-6


def random_case(seed: int, batch: int = 6, samples: int = 5, raters: int = 4, size: int = 10):
    """Random masks with a per-mask density (so some masks are empty or full) and a random rater mask."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(batch, samples + raters, 1, 1, generator=g) * 1.4 - 0.2  # < 0: empty, > 1: full
    masks = torch.rand(batch, samples + raters, size, size, generator=g) < density
    masks[0] = False  # an image where everything is empty
    masks[1, :samples] = False  # only the predictions empty
    masks[2, samples:] = False  # only the raters empty
    preds, gts = masks[:, :samples], masks[:, samples:]
    rater_mask = torch.rand(batch, raters, generator=g) < 0.7
    rater_mask[:, 0] = True
    rater_mask[3, 1:] = False  # a single real rater
    gts = gts & rater_mask[:, :, None, None]  # padding channels are empty, as in the datasets
    return preds, gts, rater_mask


def close(fast: torch.Tensor, slow: np.ndarray) -> None:
    assert fast.shape == slow.shape
    np.testing.assert_allclose(fast.numpy(), slow, rtol=0, atol=TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suite_matches_loop_reference(seed):
    preds, raters, mask = random_case(seed)
    fast = ambiguous_segmentation_metrics(preds, raters, mask, metrics=METRIC_NAMES, images_per_chunk=4)
    slow = ref.all_metrics(preds.numpy(), raters.numpy(), mask.numpy())
    for name in METRIC_NAMES:
        close(fast[name], slow[name])


@pytest.mark.parametrize("unbiased", [False, True])
def test_energy_distance_options_match_reference(unbiased):
    preds, raters, mask = random_case(3)
    p, r, m = preds.numpy(), raters.numpy(), mask.numpy()
    fast = generalized_energy_distance(preds, raters, unbiased, rater_mask=mask)
    close(fast, ref.generalized_energy_distance(p, r, unbiased, m))
    close(sample_diversity(preds, unbiased), ref.sample_diversity(p, unbiased))
    # with a single sample per image the unbiased self term has no pair
    close(generalized_energy_distance(preds[:, :1], raters, unbiased, rater_mask=mask),
          ref.generalized_energy_distance(p[:, :1], r, unbiased, m))  # fmt: skip


@pytest.mark.parametrize("include_self_pairs", [False, True])
@pytest.mark.parametrize("harmonic", [False, True])
def test_collective_insight_options_match_reference(include_self_pairs, harmonic):
    preds, raters, mask = random_case(4)
    fast = collective_insight(preds, raters, include_self_pairs, harmonic, rater_mask=mask)
    slow = ref.collective_insight(preds.numpy(), raters.numpy(), include_self_pairs, harmonic, mask.numpy())
    for key in fast:
        close(fast[key], slow[key])


@pytest.mark.parametrize("name", ["hungarian_matched_iou", "cross_pair_dice", "cross_pair_iou"])
def test_matching_scores_match_reference(name):
    """The library function and the loop reference of the same name agree."""
    preds, raters, mask = random_case(5, samples=3, raters=4)  # LCM(3, k) for k real raters
    fast = getattr(metrics, name)(preds, raters, rater_mask=mask)
    close(fast, getattr(ref, name)(preds.numpy(), raters.numpy(), mask.numpy()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_dice_with_soft_maps_matches_reference(dtype):
    preds, raters, mask = random_case(6)
    g = torch.Generator().manual_seed(60)
    # quantised soft maps hit thresholds exactly; continuous ones do not
    soft = torch.cat([preds.to(dtype).mean(1)[:3], torch.rand(3, 10, 10, generator=g, dtype=dtype)])
    for thresholds in (ref.QUBIQ_THRESHOLDS, CONSENSUS_PAPER_THRESHOLDS, (0.25,)):
        fast = soft_dice(soft, raters, thresholds, rater_mask=mask)
        close(fast, ref.soft_dice(soft.numpy(), raters.numpy(), thresholds, mask.numpy()))
    # the suite with an explicit soft map gives the same numbers
    suite = ambiguous_segmentation_metrics(preds, raters, mask, pred_soft=soft, metrics=["soft_dice"])
    close(suite["soft_dice"], ref.soft_dice(soft.numpy(), raters.numpy(), rater_mask=mask.numpy()))


def test_s_ncc_with_probabilities_matches_reference():
    preds, raters, mask = random_case(7)
    g = torch.Generator().manual_seed(70)
    probs = torch.rand(preds.shape, generator=g, dtype=torch.float64) ** 3
    close(s_ncc(probs, raters, rater_mask=mask), ref.s_ncc(probs.numpy(), raters.numpy(), mask.numpy()))
    close(s_ncc(preds, raters, rater_mask=mask), ref.s_ncc(preds.numpy(), raters.numpy(), mask.numpy()))


def test_relative_area_filter_matches_reference():
    preds, _, _ = random_case(8)
    for r in (0.0, 0.5, 1.0):
        fast = relative_area_filter(preds, r).numpy()
        np.testing.assert_array_equal(fast, ref.relative_area_filter(preds.numpy(), r))


def test_larger_random_problem_matches_reference():
    """A batch spanning several internal chunks, with more samples than raters."""
    preds, raters, mask = random_case(9, batch=20, samples=8, raters=3, size=16)
    fast = ambiguous_segmentation_metrics(preds, raters, mask)
    slow = ref.all_metrics(preds.numpy(), raters.numpy(), mask.numpy())
    for name in METRIC_NAMES:
        close(fast[name], slow[name])


def test_float_product_path_matches_int8_path(monkeypatch):
    """The batched floating-point products (used off-CPU or without torch._int_mm) give identical counts."""
    import importlib

    pairwise = importlib.import_module("ambiseg_monai.metrics.pairwise")
    preds, raters, mask = random_case(10, batch=5)
    int8_path = ambiguous_segmentation_metrics(preds, raters, mask)
    assert pairwise._int8_matmul_works()  # the CPU build used in CI has the int8 kernel
    monkeypatch.setattr(pairwise, "_int8_matmul_works", lambda: False)
    float_path = ambiguous_segmentation_metrics(preds, raters, mask)
    for name in METRIC_NAMES:
        assert torch.equal(int8_path[name], float_path[name]), name
