"""Ambiguous-segmentation metrics: pure PyTorch functions (B x N x H x W predictions, B x M x H x W raters,
per-image results) and MONAI ``CumulativeIterationMetric`` classes on top. See docs/metrics.md."""

from ambiseg_monai.metrics.collective_insight import CI_KEYS, collective_insight
from ambiseg_monai.metrics.cumulative import (
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
from ambiseg_monai.metrics.energy_distance import generalized_energy_distance, sample_diversity
from ambiseg_monai.metrics.matching import cross_pair_dice, cross_pair_iou, hungarian_matched_iou
from ambiseg_monai.metrics.ncc import s_ncc
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps
from ambiseg_monai.metrics.postprocessing import RelativeAreaFilter, RelativeAreaFilterd, relative_area_filter
from ambiseg_monai.metrics.soft_dice import CONSENSUS_PAPER_THRESHOLDS, QUBIQ_THRESHOLDS, soft_dice
from ambiseg_monai.metrics.suite import DEFAULT_HANDLER_METRICS, METRIC_NAMES, ambiguous_segmentation_metrics

__all__ = [
    "generalized_energy_distance",
    "sample_diversity",
    "collective_insight",
    "cross_pair_dice",
    "cross_pair_iou",
    "hungarian_matched_iou",
    "soft_dice",
    "s_ncc",
    "relative_area_filter",
    "ambiguous_segmentation_metrics",
    "RelativeAreaFilter",
    "RelativeAreaFilterd",
    "MaskSetOverlaps",
    "AmbiguousSegmentationMetrics",
    "GeneralizedEnergyDistanceMetric",
    "SampleDiversityMetric",
    "CollectiveInsightMetric",
    "CrossPairDiceMetric",
    "CrossPairIoUMetric",
    "HungarianMatchedIoUMetric",
    "SoftDiceMetric",
    "SNCCMetric",
    "CI_KEYS",
    "METRIC_NAMES",
    "DEFAULT_HANDLER_METRICS",
    "QUBIQ_THRESHOLDS",
    "CONSENSUS_PAPER_THRESHOLDS",
]

# metrics against a known (finite, weighted) true rater distribution, e.g. the demo dataset's stored truth
from ambiseg_monai.metrics.truth import (  # noqa: E402
    empty_fraction,
    generalized_energy_distance_to_truth,
    mode_frequency_error,
    region_inclusion_frequency,
    sampled_mode_frequencies,
    truth_scores,
)
from ambiseg_monai.metrics.speckle import isolated_pixel_fraction  # noqa: E402

__all__ += [
    "generalized_energy_distance_to_truth",
    "sampled_mode_frequencies",
    "mode_frequency_error",
    "empty_fraction",
    "region_inclusion_frequency",
    "truth_scores",
    "isolated_pixel_fraction",
]
