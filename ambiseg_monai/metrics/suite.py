"""The whole metric suite in one pass: one Gram matrix and per-pixel counts serve every metric.

MONAI's pattern: a functional metric, :func:`ambiguous_segmentation_metrics`, and a
``CumulativeIterationMetric`` on top of it, :class:`AmbiguousSegmentationMetrics`, which buffers one value per
image and metric over batches. The Ignite handler
(:class:`ambiseg_monai.handlers.AmbiguousSegmentationMetricsHandler`) wraps the class. Use them to evaluate
one or many metrics; the individual functions (``generalized_energy_distance``, ...) recompute the shared
statistics each time they are called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from monai.metrics import CumulativeIterationMetric

from ambiseg_monai.metrics.collective_insight import (
    ci_from_components,
    combined_sensitivity_from_overlaps,
    diversity_agreement_from_overlaps,
    dmax_from_overlaps,
)
from ambiseg_monai.metrics.energy_distance import (
    generalized_energy_distance_from_overlaps,
    sample_diversity_from_overlaps,
)
from ambiseg_monai.metrics.inputs import check_preds_and_raters, check_probability_stack, check_same_geometry
from ambiseg_monai.metrics.matching import (
    cross_pair_dice_from_overlaps,
    cross_pair_iou_from_overlaps,
    hungarian_matched_iou_from_overlaps,
)
from ambiseg_monai.metrics.ncc import s_ncc_from_counts
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps
from ambiseg_monai.metrics.soft_dice import QUBIQ_THRESHOLDS, soft_dice_from_counts, soft_dice_from_maps

__all__ = [
    "METRIC_NAMES",
    "DEFAULT_HANDLER_METRICS",
    "METRIC_OPTIONS",
    "ambiguous_segmentation_metrics",
    "AmbiguousSegmentationMetrics",
]

#: Every metric the suite can compute, under its stable name.
METRIC_NAMES = (
    "ged",
    "sample_diversity",
    "combined_sensitivity",
    "dmax",
    "diversity_agreement",
    "ci",
    "soft_dice",
    "hm_iou",
    "cross_pair_dice",
    "cross_pair_iou",
    "s_ncc",
)
#: The names an evaluator publishes by default.
DEFAULT_HANDLER_METRICS = METRIC_NAMES[:8]
#: Keyword options of :func:`ambiguous_segmentation_metrics` (and of the classes built on it).
METRIC_OPTIONS = ("unbiased", "include_self_pairs", "harmonic", "thresholds", "eps", "images_per_chunk")
_CI_PARTS = {"combined_sensitivity", "dmax", "diversity_agreement", "ci"}


def _check_names(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or not metrics:
        raise ValueError(f"metrics: unknown names {unknown} (or none given); choose from {METRIC_NAMES}.")
    return metrics


def _metrics_of_chunk(
    names: tuple[str, ...],
    preds: torch.Tensor,
    raters: torch.Tensor,
    mask: torch.Tensor,
    pred_soft: torch.Tensor | None,
    options: dict,
) -> dict[str, torch.Tensor]:
    """All requested metrics of a chunk of already validated images."""
    num_samples = preds.shape[1]
    overlaps = MaskSetOverlaps.from_masks(preds, raters, mask)
    results: dict[str, torch.Tensor] = {}
    if "ged" in names:
        results["ged"] = generalized_energy_distance_from_overlaps(overlaps, options["unbiased"])
    if "sample_diversity" in names:
        results["sample_diversity"] = sample_diversity_from_overlaps(overlaps, options["unbiased"])
    if _CI_PARTS & set(names):
        sensitivity = combined_sensitivity_from_overlaps(overlaps)
        dice_matching = dmax_from_overlaps(overlaps)
        agreement = diversity_agreement_from_overlaps(overlaps, options["include_self_pairs"])
        results["combined_sensitivity"] = sensitivity
        results["dmax"] = dice_matching
        results["diversity_agreement"] = agreement
        results["ci"] = ci_from_components(sensitivity, dice_matching, agreement, options["harmonic"])
    if "soft_dice" in names:
        if pred_soft is None:  # the mean of the samples: counts suffice
            results["soft_dice"] = soft_dice_from_counts(
                overlaps.pred_count, num_samples, overlaps.rater_votes, mask.sum(1), options["thresholds"]
            )
        else:
            gt_soft = overlaps.rater_votes / mask.sum(1, keepdim=True).to(torch.float64)
            results["soft_dice"] = soft_dice_from_maps(pred_soft.flatten(1), gt_soft, options["thresholds"])
    if "hm_iou" in names:
        results["hm_iou"] = hungarian_matched_iou_from_overlaps(overlaps)
    if "cross_pair_dice" in names:
        results["cross_pair_dice"] = cross_pair_dice_from_overlaps(overlaps)
    if "cross_pair_iou" in names:
        results["cross_pair_iou"] = cross_pair_iou_from_overlaps(overlaps)
    if "s_ncc" in names:
        results["s_ncc"] = s_ncc_from_counts(overlaps.pred_count, num_samples, raters, mask, options["eps"])
    return results


def ambiguous_segmentation_metrics(
    preds: torch.Tensor,
    raters: torch.Tensor,
    rater_mask: torch.Tensor | None = None,
    pred_soft: torch.Tensor | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
    unbiased: bool = False,
    include_self_pairs: bool = False,
    harmonic: bool = False,
    thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
    eps: float = 1e-8,
    images_per_chunk: int = 32,
) -> dict[str, torch.Tensor]:
    """Compute several metrics of each image, sharing the pairwise statistics.

    Args:
        preds: B x N x H x W binary predicted samples.
        raters: B x M x H x W binary rater masks.
        rater_mask: optional B x M bool marking real raters.
        pred_soft: optional B x H x W soft prediction for ``soft_dice``; default: the mean of the samples.
        metrics: names to compute (subset of :data:`METRIC_NAMES`).
        unbiased: GED / sample diversity without i = j pairs.
        include_self_pairs: diversity agreement with i = j pairs (public CIMD code).
        harmonic: CI as the true harmonic mean of its components.
        thresholds: soft Dice thresholds.
        eps: S_NCC's ε in ``log(p + ε)``.
        images_per_chunk: images processed together. Small chunks keep every temporary small enough for the
            memory allocator to reuse (fresh large allocations page-fault, which dominated the run time on
            the benchmark machine); results do not depend on it.

    Returns:
        dict name -> B float64 tensor, in the order of ``metrics``.
    """
    names = _check_names(metrics)
    preds, raters, mask = check_preds_and_raters(preds, raters, rater_mask)
    if pred_soft is not None and "soft_dice" in names:
        pred_soft = check_probability_stack(pred_soft, "pred_soft", ndim=3)
        check_same_geometry(pred_soft[:, None], raters, "pred_soft")
    else:
        pred_soft = None
    if images_per_chunk < 1:
        raise ValueError(f"images_per_chunk: must be >= 1, got {images_per_chunk}.")
    options: dict[str, Any] = dict(unbiased=unbiased, include_self_pairs=include_self_pairs, harmonic=harmonic, eps=eps)
    options["thresholds"] = tuple(thresholds)

    chunks = []
    for start in range(0, preds.shape[0], images_per_chunk):  # chunks of images, never pairs
        part = slice(start, start + images_per_chunk)
        soft_part = None if pred_soft is None else pred_soft[part]
        chunks.append(_metrics_of_chunk(names, preds[part], raters[part], mask[part], soft_part, options))
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in names}


class AmbiguousSegmentationMetrics(CumulativeIterationMetric):
    """MONAI ``CumulativeIterationMetric`` over :func:`ambiguous_segmentation_metrics`: one buffer per metric.

    ``metric(y_pred, y, rater_mask=None, pred_soft=None)`` computes the requested metrics of a batch
    (``y_pred`` B x N x H x W binary samples, ``y`` B x M x H x W rater masks), buffers them (one B x 1 column
    per metric, synchronised across ranks by MONAI's ``Cumulative``) and returns name -> B values;
    ``aggregate()`` returns name -> mean over all buffered images, ``per_image()`` name -> 1-D table.
    For a single metric pass ``metrics=["ged"]``.

    Args:
        metrics: names to compute (see :data:`METRIC_NAMES`).
        options: the metric options of :func:`ambiguous_segmentation_metrics` (``unbiased``,
            ``include_self_pairs``, ``harmonic``, ``thresholds``, ``eps``, ``images_per_chunk``).
    """

    def __init__(self, metrics: Sequence[str] = METRIC_NAMES, **options: Any) -> None:
        super().__init__()
        self.metrics = _check_names(metrics)
        unknown = sorted(set(options) - set(METRIC_OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown options {unknown}; choose from {METRIC_OPTIONS}.")
        if "thresholds" in options:
            options["thresholds"] = tuple(options["thresholds"])
        self.options = options

    def _compute_tensor(
        self,
        y_pred: torch.Tensor,
        y: torch.Tensor | None = None,
        rater_mask: torch.Tensor | None = None,
        pred_soft: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        if y is None:
            raise ValueError("AmbiguousSegmentationMetrics: the rater stack y (B x M x H x W) is required.")
        values = ambiguous_segmentation_metrics(y_pred, y, rater_mask, pred_soft, self.metrics, **self.options)
        return [values[name][:, None] for name in self.metrics]

    # narrower than MONAI's signature on purpose: batch-first tensors in, a name -> values dict out
    def __call__(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        if not isinstance(y_pred, torch.Tensor):
            raise ValueError("AmbiguousSegmentationMetrics expects batch-first tensors (B x N x H x W samples).")
        result = super().__call__(y_pred, y, **kwargs)
        columns = cast(list[torch.Tensor], result if isinstance(result, (list, tuple)) else [result])
        return {name: column[:, 0] for name, column in zip(self.metrics, columns, strict=True)}

    def per_image(self) -> dict[str, torch.Tensor]:
        """name -> 1-D float64 tensor with the value of every image seen since the last ``reset()``."""
        buffers = self.get_buffer()
        if buffers is None:
            raise ValueError("AmbiguousSegmentationMetrics: nothing buffered yet; call the metric on a batch first.")
        buffers = buffers if isinstance(buffers, list) else [buffers]
        return {name: buffer[:, 0] for name, buffer in zip(self.metrics, buffers, strict=True)}

    def aggregate(self) -> dict[str, float]:
        """name -> mean over all buffered images."""
        return {name: float(values.mean()) for name, values in self.per_image().items()}
