"""Run any exported bundle's own N-sample inferer on the slices of a volume.

The inferer is built from the ``inference.json`` embedded in the exported model (its ``inferer``
id), so the same code serves every bundle: diffusion bundles (``DiffusionSamplingInferer`` on an
:class:`~ambiseg_monai.deploy.exported.ExportedDenoiser`) and latent baselines
(``LatentSampleInferer`` on an :class:`~ambiseg_monai.deploy.exported.ExportedLatentModel`).
The only protocol relied on is ``inferer(inputs B x C x H x W, network) -> B x N x H x W`` binary
samples (or a dict holding them under ``"pred"``/``"samples"``).

A diffusion bundle's denoiser calls can run in a CPU inference engine (``engine``, ``precision``: the
inferer's ``engine`` and ``autocast_dtype``, see :mod:`ambiseg_monai.inferers.cpu_engine`);
:func:`check_engine` validates the choice before any model or image is read.
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
from ambiseg_monai.inferers.cpu_engine import ENGINES, PRECISIONS, check_precision, require_engine

__all__ = ["SlicePrediction", "AmbiguousSlicePredictor", "inferer_samples", "check_engine", "PRECISIONS"]


def check_engine(engine: str = "torch", precision: str | None = None, device: str | torch.device = "cpu") -> None:
    """Fail fast on an engine / precision choice the run cannot honour.

    Args:
        engine: one of :data:`~ambiseg_monai.inferers.cpu_engine.ENGINES`.
        precision: one of :data:`PRECISIONS`, or None (the bundle's own for ``"torch"``, float32 for an engine).
        device: the torch device of the run (the engines run on the CPU).

    Raises:
        ValueError: an unknown engine or precision, an engine on a non-CPU device, bfloat16 with onnxruntime.
        ImportError: the engine's package is missing (the message names it and the pip command).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
    if precision is not None:
        check_precision(engine, precision)
    if engine == "torch":
        return
    if torch.device(device).type != "cpu":
        raise ValueError(f"engine={engine!r} runs on the CPU; use device 'cpu' (got {device!r}) or engine='torch'.")
    require_engine(engine)


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
        engine: where a diffusion bundle's denoiser calls run: ``"torch"`` (default: the exported
            TorchScript model), ``"onnxruntime"`` or ``"openvino"`` (that model exported to ONNX on the
            first batch; CPU only); overrides ``<inferer_id>#engine``.
        precision: ``"float32"`` or ``"bfloat16"`` (onnxruntime: float32 only); overrides
            ``<inferer_id>#autocast_dtype``. None: the bundle's own with ``"torch"``, float32 with an engine.

    Raises:
        ValueError / ImportError: see :func:`check_engine` (raised before the model is read); an engine
            or precision for a model that is not a diffusion model.
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
        engine: str = "torch",
        precision: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        check_engine(engine, precision, device)
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
        overrides.update(self._engine_overrides(inferer_id, engine, precision))
        parser.update(overrides)
        self.inferer = parser.get_parsed_content(inferer_id, instantiate=True)
        self.class_label = class_label
        self.batch_size = int(batch_size)

    def _engine_overrides(self, inferer_id: str, engine: str, precision: str | None) -> dict[str, Any]:
        """Overrides of the diffusion inferer's ``engine`` and ``autocast_dtype`` (none for the defaults)."""
        if engine == "torch" and precision is None:
            return {}  # the bundle's inferer exactly as exported
        kind = self.bundle.export.get("kind")
        if kind != "diffusion":
            raise ValueError(
                f"engine and precision apply to diffusion models; this exported model is a {kind!r} one "
                "(use engine 'torch' and no precision)."
            )
        # float32 is no autocast; with an engine the precision is always set, so a bundle exported with
        # bf16 autocast does not make onnxruntime refuse to start
        autocast = None if (precision or "float32") == "float32" else precision
        overrides: dict[str, Any] = {f"{inferer_id}#autocast_dtype": autocast}
        if engine != "torch":
            overrides[f"{inferer_id}#engine"] = engine
        return overrides

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
