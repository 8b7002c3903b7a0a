"""Ambiguous-segmentation metrics: pure PyTorch functions (B x N x H x W predictions, B x M x H x W raters,
per-image results), the whole suite in one pass (:func:`ambiguous_segmentation_metrics`) and its MONAI
``CumulativeIterationMetric`` (:class:`AmbiguousSegmentationMetrics`). See docs/metrics.md.

Metrics against a known (finite, weighted) true rater distribution, e.g. the demo dataset's stored truth, are
in :mod:`.truth`; the speckle measure in :mod:`.speckle`.
"""

from ambiseg_monai.metrics.collective_insight import CI_KEYS, collective_insight
from ambiseg_monai.metrics.energy_distance import generalized_energy_distance, sample_diversity
from ambiseg_monai.metrics.matching import cross_pair_dice, cross_pair_iou, hungarian_matched_iou
from ambiseg_monai.metrics.ncc import s_ncc
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps
from ambiseg_monai.metrics.postprocessing import RelativeAreaFilter, RelativeAreaFilterd, relative_area_filter
from ambiseg_monai.metrics.soft_dice import CONSENSUS_PAPER_THRESHOLDS, QUBIQ_THRESHOLDS, soft_dice
from ambiseg_monai.metrics.speckle import isolated_pixel_fraction
from ambiseg_monai.metrics.suite import (
    DEFAULT_HANDLER_METRICS,
    METRIC_NAMES,
    METRIC_OPTIONS,
    AmbiguousSegmentationMetrics,
    ambiguous_segmentation_metrics,
)
from ambiseg_monai.metrics.truth import (
    empty_fraction,
    generalized_energy_distance_to_truth,
    mode_frequency_error,
    region_inclusion_frequency,
    sampled_mode_frequencies,
    truth_scores,
)

__all__ = [
    # per-metric functions
    "generalized_energy_distance",
    "sample_diversity",
    "collective_insight",
    "cross_pair_dice",
    "cross_pair_iou",
    "hungarian_matched_iou",
    "soft_dice",
    "s_ncc",
    # the suite: function + MONAI Cumulative metric
    "ambiguous_segmentation_metrics",
    "AmbiguousSegmentationMetrics",
    "MaskSetOverlaps",
    "METRIC_NAMES",
    "METRIC_OPTIONS",
    "DEFAULT_HANDLER_METRICS",
    "CI_KEYS",
    "QUBIQ_THRESHOLDS",
    "CONSENSUS_PAPER_THRESHOLDS",
    # post-processing
    "relative_area_filter",
    "RelativeAreaFilter",
    "RelativeAreaFilterd",
    # against a known true distribution (truth_scores: all at once), and speckle
    "truth_scores",
    "empty_fraction",
    "generalized_energy_distance_to_truth",
    "mode_frequency_error",
    "region_inclusion_frequency",
    "sampled_mode_frequencies",
    "isolated_pixel_fraction",
]
