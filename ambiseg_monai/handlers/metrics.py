"""The Ignite handler of the ambiguous-segmentation metrics: one handler over the metric suite.

Data flow in an evaluator of this project (MONAI ``SupervisedEvaluator``):
``engine.state.output`` = {"image", "label", "pred", ...} (possibly decollated into a list of per-image dicts),
``pred`` the B x N x H x W binary samples, ``label`` the B x M x H x W rater stack padded with empty masks;
``engine.state.batch["rater_mask"]`` (B x M bool, absent when every channel is a real rater).

How the rater mask reaches the metric: ignite's ``output_transform`` only sees ``engine.state.output``, so
the handler overrides ``iteration_completed`` and reads the mask from ``engine.state.batch`` through a
``batch_transform`` (default :func:`rater_mask_from_batch`, key ``"rater_mask"``; missing key -> all raters
real). This keeps the evaluator and its output untouched.

:class:`AmbiguousSegmentationMetricsHandler` computes the requested metrics of the suite from one shared
computation and publishes each under ``<prefix><name><suffix>`` in ``engine.state.metrics`` (``ged``, ``ci``,
...; ``ged_pp`` for post-processed samples with ``pred_key="pred_pp", suffix="_pp"``; ``soft_dice_5`` for the
five-threshold soft Dice with ``metrics=["soft_dice"], suffix="_5"``), where ``StatsHandler`` /
``MLFlowHandler`` pick them up. With ``save_details=True`` it fills ``engine.state.metric_details`` under the
same names (B_total x 1, like MONAI's ``IgniteMetricHandler``), which
:class:`~ambiseg_monai.handlers.PerImageMetricsWriter` (a MONAI ``MetricsSaver``) writes as one per-image table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from monai.utils import ImageMetaKey, convert_to_tensor

from ambiseg_monai.metrics.suite import DEFAULT_HANDLER_METRICS, AmbiguousSegmentationMetrics

__all__ = [
    "as_batch",
    "batch_field",
    "rater_mask_from_batch",
    "CaseIdMeta",
    "AmbiguousSegmentationMetricsHandler",
]


def as_batch(data: Any, name: str = "value") -> torch.Tensor:
    """A batch-first plain tensor from a tensor / MetaTensor / array or a list of per-image items."""
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise ValueError(f"{name}: received an empty list.")
        data = torch.stack([convert_to_tensor(item, track_meta=False) for item in data])
    return convert_to_tensor(data, track_meta=False)


def batch_field(container: Any, key: str) -> Any | None:
    """``container[key]`` of a collated batch / output (a dict), or the list of ``item[key]`` of a decollated
    one (a list of dicts); None when the key is missing (from any item)."""
    if isinstance(container, Mapping):
        return container.get(key)
    if isinstance(container, (list, tuple)) and container and all(isinstance(c, Mapping) for c in container):
        values = [c.get(key) for c in container]
        return None if any(v is None for v in values) else values
    return None


def rater_mask_from_batch(batch: Any, key: str = "rater_mask") -> torch.Tensor | None:
    """B x M bool rater mask from ``engine.state.batch`` (a dict or decollated list of dicts); None if absent."""
    mask = batch_field(batch, key)
    return None if mask is None else as_batch(mask, key).bool()


class CaseIdMeta:
    """``batch_transform`` for MONAI ``MetricsSaver``: names each per-image row by the batch's case id.

    ``MetricsSaver`` reads ``meta[ImageMetaKey.FILENAME_OR_OBJ]`` of every item returned by its
    ``batch_transform``; this returns one such dict per image holding ``batch[key]``.

    Args:
        key: batch key with the case ids (a list of strings when collated).
    """

    def __init__(self, key: str = "case_id") -> None:
        self.key = key

    def __call__(self, batch: Any) -> list[dict[str, str]]:
        ids = batch_field(batch, self.key)
        if ids is None:
            raise KeyError(f"CaseIdMeta: the batch has no '{self.key}' entry to name the per-image rows.")
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, str):
            ids = [ids]
        return [{ImageMetaKey.FILENAME_OR_OBJ: str(i)} for i in ids]


class AmbiguousSegmentationMetricsHandler(Metric):
    """Computes the metric suite once per iteration and publishes every metric under its own name.

    The results appear flattened in ``engine.state.metrics`` as ``<prefix><metric><suffix>`` (``ged``, or
    ``ged_pp`` with ``suffix="_pp"``), not under the attach name. To use it as a MONAI ``key_metric``, attach
    it under one of its published names, e.g. ``key_metric={"ci": AmbiguousSegmentationMetricsHandler()}``.
    Several instances can run on one engine (e.g. the samples and their post-processed copy), as long as
    their published names differ.

    Args:
        metrics: names to compute and publish (default: ged, ci and its three components, soft_dice, hm_iou,
            sample_diversity; add ``cross_pair_dice``, ``cross_pair_iou``, ``s_ncc`` as needed).
        pred_key: output key of the B x N x H x W binary samples.
        label_key: output key of the B x M x H x W rater stack.
        soft_pred_key: output key of a B x H x W (or B x 1 x H x W) soft map used for soft Dice when the
            output carries it (e.g. consensus diffusion's ``"pred_soft"``); otherwise, or when None, the mean
            of the samples is used.
        batch_transform: callable on ``engine.state.batch`` returning the B x M bool rater mask or None
            (default: :func:`rater_mask_from_batch`).
        prefix, suffix: put around every metric name when publishing (``suffix="_pp"``: ``ged_pp``, ...).
        save_details: store per-image values in ``engine.state.metric_details[<published name>]``
            (B_total x 1).
        options: metric options of :func:`ambiseg_monai.metrics.ambiguous_segmentation_metrics` (``unbiased``,
            ``include_self_pairs``, ``harmonic``, ``thresholds``, ``eps``, ``images_per_chunk``).
    """

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_HANDLER_METRICS,
        pred_key: str = "pred",
        label_key: str = "label",
        soft_pred_key: str | None = "pred_soft",
        batch_transform: Callable[[Any], torch.Tensor | None] = rater_mask_from_batch,
        prefix: str = "",
        suffix: str = "",
        save_details: bool = True,
        **options: Any,
    ) -> None:
        self.suite = AmbiguousSegmentationMetrics(metrics, **options)
        #: metric name -> the name it is published under
        self.published = {name: f"{prefix}{name}{suffix}" for name in self.suite.metrics}
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
        ``rater_mask`` (B x M) and ``pred_soft`` (B x H x W or B x 1 x H x W)."""
        for key in ("pred", "label"):
            if output.get(key) is None:
                raise ValueError(f"{type(self).__name__}: update() needs '{key}' in its input.")
        rater_mask = output.get("rater_mask")
        pred_soft = output.get("pred_soft")
        if pred_soft is not None:
            pred_soft = as_batch(pred_soft, "pred_soft")
            pred_soft = pred_soft[:, 0] if pred_soft.ndim == 4 and pred_soft.shape[1] == 1 else pred_soft
        self.suite(
            as_batch(output["pred"], "pred"),
            as_batch(output["label"], "label"),
            rater_mask=None if rater_mask is None else as_batch(rater_mask, "rater_mask"),
            pred_soft=pred_soft,
        )

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        state_output = engine.state.output
        batch_input = {
            "pred": batch_field(state_output, self.pred_key),
            "label": batch_field(state_output, self.label_key),
        }
        for key, source in (("pred", self.pred_key), ("label", self.label_key)):
            if batch_input[key] is None:
                raise KeyError(f"{type(self).__name__}: engine.state.output has no '{source}' entry.")
        batch_input["rater_mask"] = self.batch_transform(engine.state.batch)
        if self.soft_pred_key is not None:
            batch_input["pred_soft"] = batch_field(state_output, self.soft_pred_key)
        self.update(batch_input)

    def compute(self) -> dict[str, float]:
        if self.suite.get_buffer() is None:
            raise NotComputableError(f"{type(self).__name__} needs at least one batch before compute().")
        per_image = self.suite.per_image()
        if self.save_details:
            if self._engine is None:
                raise RuntimeError("please call attach() to connect the handler to an engine first.")
            for name, values in per_image.items():
                self._engine.state.metric_details[self.published[name]] = values[:, None]
        return {self.published[name]: float(values.mean()) for name, values in per_image.items()}

    def attach(self, engine: Engine, name: str = "ambiguous_segmentation", *args: Any, **kwargs: Any) -> None:
        super().attach(engine, name, *args, **kwargs)
        self._engine = engine
        if self.save_details and not hasattr(engine.state, "metric_details"):
            engine.state.metric_details = {}
