"""Ignite handlers for the ambiguous-segmentation metrics (MONAI ``IgniteMetricHandler`` pattern).

Data flow in an evaluator of this project (MONAI ``SupervisedEvaluator``):
``engine.state.output`` = {"image", "label", "pred"} (possibly decollated into a list of per-image dicts),
``pred`` the B x N x H x W binary samples, ``label`` the B x M x H x W rater stack padded with empty masks;
``engine.state.batch["rater_mask"]`` (B x M bool, absent when every channel is a real rater).

How the rater mask reaches the metric: ignite's ``output_transform`` only sees ``engine.state.output``, so
these handlers override ``iteration_completed`` and read the mask from ``engine.state.batch`` through a
``batch_transform`` (default :func:`rater_mask_from_batch`, key ``"rater_mask"``; missing key -> all raters
real). This keeps the evaluator and its output untouched.

- :class:`AmbiguousSegmentationMetricsHandler` computes the whole suite from one shared computation and
  publishes every metric under its stable name in ``engine.state.metrics`` (``ged``, ``ci``,
  ``combined_sensitivity``, ``max_dice_matching``, ``diversity_agreement``, ``soft_dice``, ``hm_iou``,
  ``sample_diversity`` by default), where ``StatsHandler`` / ``MLFlowHandler`` pick them up. With
  ``save_details=True`` it fills ``engine.state.metric_details[name]`` (B_total x 1, like MONAI's
  ``IgniteMetricHandler``) so ``MetricsSaver(metric_details="*", batch_transform=CaseIdMeta())`` writes one
  ``{name}_raw.csv`` per metric with the case ids as row names.
- One handler per metric (:class:`GeneralizedEnergyDistance`, :class:`CollectiveInsight`, ...) wraps the
  corresponding MONAI metric class, for configs that want a single metric.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler
from monai.handlers.utils import from_engine
from monai.utils import ImageMetaKey, convert_to_tensor

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
from ambiseg_monai.metrics.soft_dice import QUBIQ_THRESHOLDS
from ambiseg_monai.metrics.suite import DEFAULT_HANDLER_METRICS

__all__ = [
    "rater_mask_from_batch",
    "CaseIdMeta",
    "AmbiguousSegmentationMetricsHandler",
    "RaterAwareMetricHandler",
    "GeneralizedEnergyDistance",
    "SampleDiversity",
    "CollectiveInsight",
    "HungarianMatchedIoU",
    "CrossPairDice",
    "CrossPairIoU",
    "SoftDice",
    "SNCC",
]


def _as_batch(data: Any, name: str) -> torch.Tensor:
    """A batch-first plain tensor from a tensor / MetaTensor / array or a list of per-image items."""
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise ValueError(f"{name}: received an empty list.")
        data = torch.stack([convert_to_tensor(item, track_meta=False) for item in data])
    return convert_to_tensor(data, track_meta=False)


def _items(container: Any, key: str) -> Any | None:
    """``container[key]`` for a dict, the list of ``item[key]`` for a list of dicts; None when missing."""
    if isinstance(container, Mapping):
        return container.get(key)
    if isinstance(container, (list, tuple)) and container and all(isinstance(c, Mapping) for c in container):
        values = [c.get(key) for c in container]
        return None if any(v is None for v in values) else values
    return None


def rater_mask_from_batch(batch: Any, key: str = "rater_mask") -> torch.Tensor | None:
    """B x M bool rater mask from ``engine.state.batch`` (a dict or decollated list of dicts); None if absent."""
    mask = _items(batch, key)
    return None if mask is None else _as_batch(mask, key).bool()


class CaseIdMeta:
    """``batch_transform`` for MONAI ``MetricsSaver``: names each per-image CSV row by the batch's case id.

    ``MetricsSaver`` reads ``meta[ImageMetaKey.FILENAME_OR_OBJ]`` of every item returned by its
    ``batch_transform``; this returns one such dict per image holding ``batch[key]``.

    Args:
        key: batch key with the case ids (a list of strings when collated).
    """

    def __init__(self, key: str = "case_id") -> None:
        self.key = key

    def __call__(self, batch: Any) -> list[dict[str, str]]:
        ids = _items(batch, self.key)
        if ids is None:
            raise KeyError(f"CaseIdMeta: the batch has no '{self.key}' entry to name the per-image rows.")
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, str):
            ids = [ids]
        return [{ImageMetaKey.FILENAME_OR_OBJ: str(i)} for i in ids]


class AmbiguousSegmentationMetricsHandler(Metric):
    """Computes the whole metric suite once per iteration and publishes every metric under its own name.

    Attach it under any name; the results appear flattened (``engine.state.metrics["ged"]``, ...), not under
    the attach name. To use it as a MONAI ``key_metric``, give it a published name, e.g.
    ``key_metric={"ci": AmbiguousSegmentationMetricsHandler()}``.

    Args:
        metrics: names to compute and publish (default: ged, ci and its three components, soft_dice, hm_iou,
            sample_diversity; add ``cross_pair_dice``, ``cross_pair_iou``, ``s_ncc`` as needed).
        pred_key: output key of the B x N x H x W binary samples.
        label_key: output key of the B x M x H x W rater stack.
        soft_pred_key: output key of a B x H x W soft map used for soft Dice when the output carries it (e.g.
            consensus diffusion's ``"pred_soft"``); otherwise, or when None, the mean of the samples is used.
        batch_transform: callable on ``engine.state.batch`` returning the B x M bool rater mask or None
            (default: :func:`rater_mask_from_batch`).
        unbiased, include_self_pairs, harmonic, thresholds, eps: metric options, see
            :func:`ambiseg_monai.metrics.ambiguous_segmentation_metrics`.
        save_details: store per-image values in ``engine.state.metric_details[name]`` (B_total x 1).
    """

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_HANDLER_METRICS,
        pred_key: str = "pred",
        label_key: str = "label",
        soft_pred_key: str | None = "pred_soft",
        batch_transform: Callable[[Any], torch.Tensor | None] = rater_mask_from_batch,
        unbiased: bool = False,
        include_self_pairs: bool = False,
        harmonic: bool = False,
        thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
        eps: float = 1e-8,
        save_details: bool = True,
    ) -> None:
        self.suite = AmbiguousSegmentationMetrics(
            metrics, unbiased=unbiased, include_self_pairs=include_self_pairs, harmonic=harmonic,
            thresholds=thresholds, eps=eps,
        )  # fmt: skip
        self.pred_key, self.label_key, self.soft_pred_key = pred_key, label_key, soft_pred_key
        self.batch_transform = batch_transform
        self.save_details = save_details
        self._engine: Engine | None = None
        super().__init__(output_transform=lambda x: x, metrics_result_mode="flatten")

    @reinit__is_reduced
    def reset(self) -> None:
        self.suite.reset()

    @reinit__is_reduced
    def update(self, output: Mapping[str, Any]) -> None:
        """Add one batch: a mapping with ``pred`` (B x N x H x W), ``label`` (B x M x H x W) and optionally
        ``rater_mask`` (B x M) and ``pred_soft`` (B x H x W)."""
        for key in ("pred", "label"):
            if output.get(key) is None:
                raise ValueError(f"AmbiguousSegmentationMetricsHandler: update() needs '{key}' in its input.")
        rater_mask = output.get("rater_mask")
        pred_soft = output.get("pred_soft")
        if pred_soft is not None:
            pred_soft = _as_batch(pred_soft, "pred_soft")
            pred_soft = pred_soft[:, 0] if pred_soft.ndim == 4 and pred_soft.shape[1] == 1 else pred_soft
        self.suite(
            _as_batch(output["pred"], "pred"),
            _as_batch(output["label"], "label"),
            rater_mask=None if rater_mask is None else _as_batch(rater_mask, "rater_mask"),
            pred_soft=pred_soft,
        )

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        state_output = engine.state.output
        batch_input = {"pred": _items(state_output, self.pred_key), "label": _items(state_output, self.label_key)}
        for key, source in (("pred", self.pred_key), ("label", self.label_key)):
            if batch_input[key] is None:
                raise KeyError(f"AmbiguousSegmentationMetricsHandler: engine.state.output has no '{source}' entry.")
        batch_input["rater_mask"] = self.batch_transform(engine.state.batch)
        if self.soft_pred_key is not None:
            batch_input["pred_soft"] = _items(state_output, self.soft_pred_key)
        self.update(batch_input)

    def compute(self) -> dict[str, float]:
        if self.suite.get_buffer() is None:
            raise NotComputableError("AmbiguousSegmentationMetricsHandler needs at least one batch before compute().")
        per_image = self.suite.per_image()
        if self.save_details:
            if self._engine is None:
                raise RuntimeError("please call attach() to connect the handler to an engine first.")
            for name, values in per_image.items():
                self._engine.state.metric_details[name] = values[:, None]
        return {name: float(values.mean()) for name, values in per_image.items()}

    def attach(self, engine: Engine, name: str = "ambiguous_segmentation", *args: Any, **kwargs: Any) -> None:
        super().attach(engine, name, *args, **kwargs)
        self._engine = engine
        if self.save_details and not hasattr(engine.state, "metric_details"):
            engine.state.metric_details = {}  # type: ignore[attr-defined]


class RaterAwareMetricHandler(IgniteMetricHandler):
    """``IgniteMetricHandler`` that also passes the rater mask from ``engine.state.batch`` to ``metric_fn``.

    Args:
        metric_fn: a :class:`~ambiseg_monai.metrics.cumulative.PerImageMetric`.
        output_transform: ``engine.state.output`` -> ``(y_pred, y)`` (tensors or lists of per-image tensors);
            default ``from_engine(["pred", "label"])``.
        batch_transform: ``engine.state.batch`` -> B x M bool rater mask or None.
        save_details: save per-image values to ``engine.state.metric_details`` under the attach name.
    """

    def __init__(
        self,
        metric_fn: Any,
        output_transform: Callable = from_engine(["pred", "label"]),
        batch_transform: Callable[[Any], torch.Tensor | None] = rater_mask_from_batch,
        save_details: bool = True,
    ) -> None:
        self.batch_transform = batch_transform
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        y_pred, y = self._output_transform(engine.state.output)
        self.update((y_pred, y, self.batch_transform(engine.state.batch)))

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """Add one batch: ``(y_pred, y)`` or ``(y_pred, y, rater_mask)``."""
        if len(output) not in (2, 3):
            raise ValueError(f"output must be (y_pred, y) or (y_pred, y, rater_mask), got length {len(output)}.")
        rater_mask = output[2] if len(output) == 3 else None
        y = None if output[1] is None else _as_batch(output[1], "y")
        self.metric_fn(
            self._prediction(_as_batch(output[0], "y_pred")),
            y,
            rater_mask=None if rater_mask is None else _as_batch(rater_mask, "rater_mask"),
        )

    def _prediction(self, y_pred: torch.Tensor) -> torch.Tensor:
        return y_pred


class GeneralizedEnergyDistance(RaterAwareMetricHandler):
    """Handler for GED (publish it as ``ged``)."""

    def __init__(self, unbiased: bool = False, **kwargs: Any) -> None:
        super().__init__(metric_fn=GeneralizedEnergyDistanceMetric(unbiased=unbiased), **kwargs)


class SampleDiversity(RaterAwareMetricHandler):
    """Handler for the sample diversity (publish it as ``sample_diversity``)."""

    def __init__(self, unbiased: bool = False, **kwargs: Any) -> None:
        super().__init__(metric_fn=SampleDiversityMetric(unbiased=unbiased), **kwargs)


class CollectiveInsight(RaterAwareMetricHandler):
    """Handler for CI or one of its components (``component``), publish it under that component's name."""

    def __init__(
        self, component: str = "ci", include_self_pairs: bool = False, harmonic: bool = False, **kwargs: Any
    ) -> None:
        metric = CollectiveInsightMetric(component=component, include_self_pairs=include_self_pairs, harmonic=harmonic)
        super().__init__(metric_fn=metric, **kwargs)


class HungarianMatchedIoU(RaterAwareMetricHandler):
    """Handler for the Hungarian-matched IoU (publish it as ``hm_iou``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metric_fn=HungarianMatchedIoUMetric(), **kwargs)


class CrossPairDice(RaterAwareMetricHandler):
    """Handler for the mean cross-pair Dice (publish it as ``cross_pair_dice``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metric_fn=CrossPairDiceMetric(), **kwargs)


class CrossPairIoU(RaterAwareMetricHandler):
    """Handler for the mean cross-pair IoU (publish it as ``cross_pair_iou``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metric_fn=CrossPairIoUMetric(), **kwargs)


class SNCC(RaterAwareMetricHandler):
    """Handler for PHiSeg's S_NCC (publish it as ``s_ncc``)."""

    def __init__(self, eps: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(metric_fn=SNCCMetric(eps=eps), **kwargs)


class SoftDice(RaterAwareMetricHandler):
    """Handler for the QUBIQ soft Dice (publish it as ``soft_dice``).

    The soft prediction is the mean of the samples (default ``output_transform`` reads ``"pred"``); to use a
    soft map carried by the output instead, pass ``output_transform=from_engine(["pred_soft", "label"])``:
    a B x H x W (or B x 1 x H x W) map is treated as one channel.
    """

    def __init__(self, thresholds: Sequence[float] = QUBIQ_THRESHOLDS, **kwargs: Any) -> None:
        super().__init__(metric_fn=SoftDiceMetric(thresholds=thresholds), **kwargs)

    def _prediction(self, y_pred: torch.Tensor) -> torch.Tensor:
        return y_pred[:, None] if y_pred.ndim == 3 else y_pred
