"""Run any exported bundle's own N-sample inferer on the slices of a volume.

The inferer is built from the ``inference.json`` embedded in the exported model (its ``inferer``
id), so the same code serves every bundle: diffusion bundles (``DiffusionSamplingInferer`` on an
:class:`~ambiseg_monai.deploy.exported.ExportedDenoiser`) and latent baselines
(``LatentSampleInferer`` on an :class:`~ambiseg_monai.deploy.exported.ExportedLatentModel`).
The only protocol relied on is ``inferer(inputs B x C x H x W, network) -> B x N x H x W`` binary
samples (or a dict holding them under ``"pred"``/``"samples"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

from ambiseg_monai.deploy.exported import ExportedBundle, load_exported_bundle
from ambiseg_monai.deploy.preprocessing import (
    consensus_mask,
    normalise_intensity,
    parse_slice_selection,
    resample_to_grid,
)

__all__ = ["SlicePrediction", "AmbiguousSlicePredictor", "inferer_samples"]


def inferer_samples(output: Any) -> torch.Tensor:
    """The B x N x H x W binary samples from an N-sample inferer's output (a tensor or a dict)."""
    if isinstance(output, Mapping):
        for key in ("pred", "samples"):
            if key in output:
                return output[key]
        raise ValueError(f"the inferer returned a dict without 'pred' or 'samples' (keys {sorted(output)}).")
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        raise ValueError(
            f"the inferer must return B x N x H x W samples, got {getattr(output, 'shape', type(output))}."
        )
    return output


@dataclass
class SlicePrediction:
    """Predictions for the selected slices of a D x H x W volume, on the volume's own grid.

    Attributes:
        slice_indices: S selected slice indices (volume order).
        samples: S x N x H x W uint8 {0, 1}, the N plausible masks.
        consensus: S x H x W uint8, majority vote of the N masks.
        mean: S x H x W float32, per-pixel foreground frequency over the N masks.
        variance: S x H x W float32, p (1 - p) of the same.
        volume_shape: (D, H, W).
    """

    slice_indices: list[int]
    samples: np.ndarray
    consensus: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    volume_shape: tuple[int, int, int]

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[1])

    def full_volume(self, maps: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """S x H x W (x ...) per-slice values -> D x H x W (x ...) with ``fill`` on slices not processed."""
        out = np.full((self.volume_shape[0], *maps.shape[1:]), fill, dtype=maps.dtype)
        out[self.slice_indices] = maps
        return out


class AmbiguousSlicePredictor:
    """An exported bundle ready to segment slices: preprocessing, the bundle's inferer, resampling back.

    Args:
        model_path: the exported ``model.ts``.
        num_samples: N (default: the bundle's); overrides ``<inferer_id>#num_samples``.
        num_inference_steps: sampling steps for diffusion inferers (default: the bundle's).
        inferer_overrides: further config overrides (id -> value) applied to the embedded inference config.
        class_label: class label for models conditioned on a consensus level / rater id.
        batch_size: slices per inferer call (each slice costs N network rows per step).
        device: torch device.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        num_samples: int | None = None,
        num_inference_steps: int | None = None,
        inferer_overrides: Mapping[str, Any] | None = None,
        class_label: int | None = None,
        batch_size: int = 4,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.device = torch.device(device)
        self.bundle: ExportedBundle = load_exported_bundle(model_path, self.device)
        if self.bundle.image_channels != 1:
            raise ValueError(
                f"{model_path}: the model takes {self.bundle.image_channels} image channels; the deploy application "
                "feeds one series or one NIfTI image (1 channel)."
            )
        inferer_id = self.bundle.export.get("inferer_id", "inferer")
        parser = ConfigParser(self.bundle.inference_config)
        overrides = dict(inferer_overrides or {})
        inferer_config = parser.get(inferer_id) or {}
        for name, value in (("num_samples", num_samples), ("num_inference_steps", num_inference_steps)):
            if value is None:
                continue
            if name not in inferer_config:
                raise ValueError(
                    f"the bundle's inferer ({inferer_config.get('_target_', '?')}) has no '{name}' to set."
                )
            overrides[f"{inferer_id}#{name}"] = int(value)
        parser.update(overrides)
        self.inferer = parser.get_parsed_content(inferer_id, instantiate=True)
        self.class_label = class_label
        self.batch_size = int(batch_size)

    @property
    def modalities(self) -> list[str]:
        return list(self.bundle.export.get("modalities", []))

    @torch.no_grad()
    def predict(self, volume: np.ndarray, slices: str | Sequence[int] | None = None) -> SlicePrediction:
        """Segment the selected slices of ``volume`` (D x H x W, scanner units) N times.

        Args:
            volume: D x H x W (a 2D image: 1 x H x W).
            slices: ``None``/``"all"``, ``"0,3,5-7"`` or a list of 0-based slice indices.
        """
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"expected a D x H x W volume, got shape {volume.shape}.")
        indices = parse_slice_selection(slices, volume.shape[0])
        size = volume.shape[1:]
        images = normalise_intensity(volume[indices], self.bundle.export["intensity"])
        model_inputs = resample_to_grid(torch.from_numpy(images)[:, None], self.bundle.spatial_shape, "bilinear")
        samples, means, variances = [], [], []
        for start in range(0, len(indices), self.batch_size):
            batch = model_inputs[start : start + self.batch_size].to(self.device)
            kwargs: dict[str, Any] = {"image_ids": indices[start : start + self.batch_size]}
            if self.class_label is not None:
                kwargs["class_labels"] = torch.full((batch.shape[0],), int(self.class_label), dtype=torch.long)
            pred = inferer_samples(self.inferer(batch, self.bundle.network, **kwargs)).float().cpu()
            # maps on the model grid, then linearly to the slice grid; masks with nearest neighbours
            mean = pred.mean(dim=1, keepdim=True)
            variance = pred.var(dim=1, unbiased=False, keepdim=True)
            samples.append(resample_to_grid(pred, size, "nearest"))
            means.append(resample_to_grid(mean, size, "bilinear"))
            variances.append(resample_to_grid(variance, size, "bilinear"))
        all_samples = torch.cat(samples).round().to(torch.uint8)
        return SlicePrediction(
            slice_indices=indices,
            samples=all_samples.numpy(),
            consensus=consensus_mask(all_samples).numpy(),
            mean=torch.cat(means)[:, 0].clamp(0, 1).numpy().astype(np.float32),
            variance=torch.cat(variances)[:, 0].clamp(0, 0.25).numpy().astype(np.float32),
            volume_shape=(int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2])),
        )
