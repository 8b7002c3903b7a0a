"""MONAI ``CumulativeIterationMetric`` classes over the functional metrics.

Each class is called once per batch, ``metric(y_pred, y, rater_mask=None)``, with ``y_pred`` the
B x N x H x W binary samples and ``y`` the B x M x H x W rater stack; it buffers one value per image
(a B x 1 column, so MONAI's ``MetricsSaver`` / ``IgniteMetricHandler(save_details=True)`` can write a
per-image table), ``aggregate()`` returns the mean over images, and ``per_image()`` the 1-D table.
:class:`AmbiguousSegmentationMetrics` computes many metrics at once from shared statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from ambiseg_monai.metrics.collective_insight import CI_KEYS, collective_insight
from ambiseg_monai.metrics.energy_distance import generalized_energy_distance, sample_diversity
from ambiseg_monai.metrics.inputs import check_probability_stack
from ambiseg_monai.metrics.matching import cross_pair_dice, cross_pair_iou, hungarian_matched_iou
from ambiseg_monai.metrics.ncc import s_ncc
from ambiseg_monai.metrics.soft_dice import QUBIQ_THRESHOLDS, soft_dice
from ambiseg_monai.metrics.suite import METRIC_NAMES, ambiguous_segmentation_metrics

__all__ = [
    "PerImageMetric",
    "GeneralizedEnergyDistanceMetric",
    "SampleDiversityMetric",
    "CollectiveInsightMetric",
    "CrossPairDiceMetric",
    "CrossPairIoUMetric",
    "HungarianMatchedIoUMetric",
    "SoftDiceMetric",
    "SNCCMetric",
    "AmbiguousSegmentationMetrics",
]


def _require_raters(y: torch.Tensor | None, metric: str) -> torch.Tensor:
    if y is None:
        raise ValueError(f"{metric}: the rater stack y (B x M x H x W) is required.")
    return y


class PerImageMetric(CumulativeIterationMetric):
    """Base class: one value per image, aggregated with a MONAI reduction (default: mean over images).

    Subclasses implement ``_per_image(y_pred, y, rater_mask) -> B tensor``.

    Args:
        reduction: MONAI reduction applied by ``aggregate`` (``"mean"``; ``"none"`` returns the per-image column).
        get_not_nans: also return the count of non-NaN values from ``aggregate``.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _per_image(self, y_pred: torch.Tensor, y: torch.Tensor | None, rater_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _per_image.")

    def _compute_tensor(
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, rater_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return self._per_image(y_pred, y, rater_mask)[:, None]

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered B_total x 1 values (default: mean over images, ignoring NaN)."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__}: nothing to aggregate; call the metric on a batch first.")
        reduction = reduction or self.reduction
        if reduction == MetricReduction.MEAN:
            # MONAI's do_metric_reduction casts to float32; keep float64 for the mean over images.
            valid = ~torch.isnan(data[:, 0])
            f = data[valid, 0].mean().reshape(1) if valid.any() else torch.full((1,), float("nan"), dtype=data.dtype)
            not_nans = valid.sum().to(data.dtype).reshape(1)
        else:
            f, not_nans = do_metric_reduction(data, reduction)
        return (f, not_nans) if self.get_not_nans else f

    def per_image(self) -> torch.Tensor:
        """1-D tensor with the value of every image seen since the last ``reset()``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__}: no values buffered yet.")
        return data[:, 0]


class GeneralizedEnergyDistanceMetric(PerImageMetric):
    """GED with ``d = 1 - IoU`` (see :func:`~ambiseg_monai.metrics.generalized_energy_distance`)."""

    def __init__(self, unbiased: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unbiased = unbiased

    def _per_image(self, y_pred, y, rater_mask):
        return generalized_energy_distance(y_pred, _require_raters(y, "ged"), self.unbiased, rater_mask=rater_mask)


class SampleDiversityMetric(PerImageMetric):
    """Mean pairwise ``1 - IoU`` between samples; ``y`` is ignored (may be None)."""

    def __init__(self, unbiased: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unbiased = unbiased

    def _per_image(self, y_pred, y, rater_mask):
        return sample_diversity(y_pred, self.unbiased)


class CollectiveInsightMetric(PerImageMetric):
    """One CI quantity per image: ``component`` is ``"ci"`` (default) or one of its three components.

    To get CI and all components from one computation use :class:`AmbiguousSegmentationMetrics`.
    """

    def __init__(
        self, component: str = "ci", include_self_pairs: bool = False, harmonic: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if component not in CI_KEYS:
            raise ValueError(f"component: expected one of {CI_KEYS}, got {component!r}.")
        self.component = component
        self.include_self_pairs = include_self_pairs
        self.harmonic = harmonic

    def _per_image(self, y_pred, y, rater_mask):
        scores = collective_insight(
            y_pred, _require_raters(y, "ci"), self.include_self_pairs, self.harmonic, rater_mask=rater_mask
        )
        return scores[self.component]


class CrossPairDiceMetric(PerImageMetric):
    """Mean Dice over all (rater, prediction) pairs."""

    def _per_image(self, y_pred, y, rater_mask):
        return cross_pair_dice(y_pred, _require_raters(y, "cross_pair_dice"), rater_mask=rater_mask)


class CrossPairIoUMetric(PerImageMetric):
    """Mean IoU over all (rater, prediction) pairs."""

    def _per_image(self, y_pred, y, rater_mask):
        return cross_pair_iou(y_pred, _require_raters(y, "cross_pair_iou"), rater_mask=rater_mask)


class HungarianMatchedIoUMetric(PerImageMetric):
    """Hungarian-matched IoU (CCDM)."""

    def _per_image(self, y_pred, y, rater_mask):
        return hungarian_matched_iou(y_pred, _require_raters(y, "hm_iou"), rater_mask=rater_mask)


class SoftDiceMetric(PerImageMetric):
    """QUBIQ soft Dice. ``y_pred`` is B x C x H x W in [0, 1]; the soft prediction is its mean over C, so pass
    the B x N x H x W binary samples (soft map = sample mean) or a B x 1 x H x W soft map."""

    def __init__(self, thresholds: Sequence[float] = QUBIQ_THRESHOLDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(thresholds)

    def _per_image(self, y_pred, y, rater_mask):
        y_pred = check_probability_stack(y_pred, "y_pred", ndim=4)
        return soft_dice(y_pred.mean(1), _require_raters(y, "soft_dice"), self.thresholds, rater_mask=rater_mask)


class SNCCMetric(PerImageMetric):
    """PHiSeg's S_NCC; ``y_pred`` holds binary samples or per-sample foreground probabilities."""

    def __init__(self, eps: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eps = eps

    def _per_image(self, y_pred, y, rater_mask):
        return s_ncc(y_pred, _require_raters(y, "s_ncc"), rater_mask=rater_mask, eps=self.eps)


class AmbiguousSegmentationMetrics(CumulativeIterationMetric):
    """Several metrics per batch from one shared computation, one buffer per metric.

    ``metric(y_pred, y, rater_mask=None, pred_soft=None)`` returns a dict name -> B values and buffers them;
    ``aggregate()`` returns name -> mean over images, ``per_image()`` name -> 1-D per-image table.

    Args:
        metrics: names to compute (see :data:`~ambiseg_monai.metrics.METRIC_NAMES`).
        unbiased, include_self_pairs, harmonic, thresholds, eps: metric options, as in
            :func:`~ambiseg_monai.metrics.ambiguous_segmentation_metrics`.
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRIC_NAMES,
        unbiased: bool = False,
        include_self_pairs: bool = False,
        harmonic: bool = False,
        thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown or not metrics:
            raise ValueError(f"metrics: unknown names {unknown} (or none given); choose from {METRIC_NAMES}.")
        self.metrics = tuple(metrics)
        self.options = dict(
            unbiased=unbiased,
            include_self_pairs=include_self_pairs,
            harmonic=harmonic,
            thresholds=tuple(thresholds),
            eps=eps,
        )

    def _compute_tensor(
        self,
        y_pred: torch.Tensor,
        y: torch.Tensor | None = None,
        rater_mask: torch.Tensor | None = None,
        pred_soft: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        values = ambiguous_segmentation_metrics(
            y_pred, _require_raters(y, "metrics"), rater_mask, pred_soft, self.metrics, **self.options
        )
        return [values[name][:, None] for name in self.metrics]

    def __call__(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        if not isinstance(y_pred, torch.Tensor):
            raise ValueError("AmbiguousSegmentationMetrics expects batch-first tensors (B x N x H x W samples).")
        columns = super().__call__(y_pred, y, **kwargs)
        columns = columns if isinstance(columns, (list, tuple)) else [columns]
        return {name: column[:, 0] for name, column in zip(self.metrics, columns)}

    def per_image(self) -> dict[str, torch.Tensor]:
        """name -> 1-D tensor with the value of every image seen since the last ``reset()``."""
        buffers = self.get_buffer()
        if buffers is None:
            raise ValueError("AmbiguousSegmentationMetrics: no values buffered yet.")
        buffers = buffers if isinstance(buffers, list) else [buffers]
        return {name: buffer[:, 0] for name, buffer in zip(self.metrics, buffers)}

    def aggregate(self) -> dict[str, float]:
        """name -> mean over all buffered images."""
        return {name: float(values.mean()) for name, values in self.per_image().items()}
