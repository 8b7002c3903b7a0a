"""``prepare_batch`` callables turning a multi-rater batch dict into engine inputs.

MONAI engines call ``prepare_batch(batchdata, device, non_blocking, **to_kwargs)`` and accept
``(inputs, targets, args, kwargs)``; ``args``/``kwargs`` go to the inferer. Batch keys follow the
data contract: ``image`` B x C x H x W, ``label`` B x M x H x W (all raters, padded),
``rater_mask`` B x M, ``target`` B x 1 x H x W, ``class_label`` (B,), ``case_id`` (B strings).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import PrepareBatch

__all__ = ["DiffusionTrainingPrepareBatch", "SamplingPrepareBatch", "to_engine_tensor"]


def to_engine_tensor(
    value, device: str | torch.device | None, non_blocking: bool = False, channels_last: bool = False
) -> torch.Tensor:
    """A plain tensor on ``device`` (MetaTensor metadata dropped: the engines do not need it)."""
    tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    tensor = tensor.to(device=device, non_blocking=non_blocking)
    if channels_last and tensor.ndim == 4 and tensor.device.type == "cuda":
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def _require(batch: Mapping, key: str, what: str) -> object:
    if key not in batch:
        raise KeyError(f"the batch has no '{key}' ({what}); keys present: {sorted(map(str, batch))}.")
    return batch[key]


def _check_image(image: torch.Tensor, image_channels: int | None, batch: Mapping) -> None:
    if image.ndim != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(image.shape)}.")
    if image_channels is not None and image.shape[1] != image_channels:
        cases = batch.get("case_id")
        where = f" (cases {list(cases)})" if cases is not None else ""
        raise ValueError(
            f"images have {image.shape[1]} channel(s) but the network expects image_channels={image_channels}{where}; "
            "set image_channels to the dataset's value."
        )


def _check_rater_stack(stack: torch.Tensor, image: torch.Tensor, what: str) -> None:
    if stack.ndim != 4 or stack.shape[0] != image.shape[0] or stack.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"{what} must be B x R x H x W (all raters) matching the images {tuple(image.shape)}, "
            f"got {tuple(stack.shape)}."
        )


class _ImagePrepareBatch(PrepareBatch):
    """What both prepare_batch callables share: the images (checked), the optional class labels, the
    rater mask's key.

    Args (keywords of both subclasses):
        image_key: batch key of the B x C x H x W images.
        class_label_key: key of per-image integer labels (consensus level, rater id) or None.
        image_channels: when set, a batch with another channel count raises a clear error.
        channels_last: use channels-last memory on CUDA.
        rater_mask_key: key of the B x R bool mask of the real (not padded) raters.
    """

    def __init__(
        self,
        image_key: str = "image",
        class_label_key: str | None = None,
        image_channels: int | None = None,
        channels_last: bool = True,
        rater_mask_key: str = "rater_mask",
    ) -> None:
        self.image_key = image_key
        self.class_label_key = class_label_key
        self.image_channels = image_channels
        self.channels_last = channels_last
        self.rater_mask_key = rater_mask_key

    def _image(self, batchdata: Mapping, device, non_blocking: bool) -> torch.Tensor:
        """The B x C x H x W images on ``device``, checked against ``image_channels``."""
        image = to_engine_tensor(
            _require(batchdata, self.image_key, "images"), device, non_blocking, self.channels_last
        )
        _check_image(image, self.image_channels, batchdata)
        return image

    def _class_labels(self, batchdata: Mapping, device) -> torch.Tensor | None:
        """The (B,) integer class labels, or None without a ``class_label_key``."""
        if self.class_label_key is None:
            return None
        return to_engine_tensor(_require(batchdata, self.class_label_key, "class labels"), device).long().flatten()


class DiffusionTrainingPrepareBatch(_ImagePrepareBatch):
    """Training batch -> ``(image, target, (), {"target": target, "class_labels": labels})``.

    Args:
        target_key: batch key of the training target (chosen by the label-strategy transform: one
            random rater, the mean, a consensus level...).
        rater_key: when set, also pass all raters (B x R x H x W) and the rater mask (B x R, under
            ``rater_mask_key``) as the inferer keywords ``raters`` and ``rater_mask`` (for
            rater-posterior training targets).
        options: ``image_key``, ``class_label_key``, ``image_channels``, ``channels_last``,
            ``rater_mask_key`` (see ``_ImagePrepareBatch``).
    """

    def __init__(self, target_key: str = "target", rater_key: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.target_key = target_key
        self.rater_key = rater_key

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        image = self._image(batchdata, device, non_blocking)
        target = to_engine_tensor(_require(batchdata, self.target_key, "training targets"), device, non_blocking)
        if target.ndim == 3:  # B x H x W -> B x 1 x H x W
            target = target[:, None]
        if target.shape[0] != image.shape[0] or target.shape[2:] != image.shape[2:]:
            raise ValueError(f"target shape {tuple(target.shape)} does not match image shape {tuple(image.shape)}.")
        kwargs_out = {"target": target, "class_labels": self._class_labels(batchdata, device)}
        if self.rater_key is not None:
            raters = to_engine_tensor(_require(batchdata, self.rater_key, "all raters' masks"), device, non_blocking)
            _check_rater_stack(raters, image, f"'{self.rater_key}'")
            kwargs_out["raters"] = raters
            kwargs_out["rater_mask"] = to_engine_tensor(
                _require(batchdata, self.rater_mask_key, "which raters are real"), device, non_blocking
            ).bool()
        return image, target, (), kwargs_out


class SamplingPrepareBatch(_ImagePrepareBatch):
    """Evaluation / inference batch -> ``(image, label or None, (), {"image_ids": ids, ...})``.

    ``label`` (all raters, B x M x H x W) is the evaluator's target for the metric handlers; it is
    optional so that inference works on unlabeled images. ``image_ids`` (case ids) seed the samples.

    Args:
        label_key, id_key: batch keys.
        options: ``image_key``, ``class_label_key``, ``image_channels``, ``channels_last``,
            ``rater_mask_key``, as in :class:`DiffusionTrainingPrepareBatch`.
    """

    def __init__(self, label_key: str = "label", id_key: str = "case_id", **options: Any) -> None:
        super().__init__(**options)
        self.label_key = label_key
        self.id_key = id_key

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        image = self._image(batchdata, device, non_blocking)
        label = None
        if self.label_key in batchdata:
            label = to_engine_tensor(batchdata[self.label_key], device, non_blocking)
            _check_rater_stack(label, image, f"labels ('{self.label_key}')")
            if self.rater_mask_key in batchdata:
                rater_mask = torch.as_tensor(batchdata[self.rater_mask_key])
                if rater_mask.shape != label.shape[:2]:
                    raise ValueError(
                        f"rater_mask has shape {tuple(rater_mask.shape)} but the labels hold {label.shape[1]} "
                        f"rater channels for {label.shape[0]} images (rater count mismatch)."
                    )
        ids = batchdata.get(self.id_key)
        kwargs_out: dict = {"image_ids": list(ids) if ids is not None else None}
        if self.class_label_key is not None:
            kwargs_out["class_labels"] = self._class_labels(batchdata, device)
        return image, label, (), kwargs_out
