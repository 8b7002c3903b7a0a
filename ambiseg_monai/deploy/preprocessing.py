"""Slice preparation for a deployed model and the way back to the scanner's grid.

A volume arrives as D x H x W in scanner units (HU for CT after the DICOM rescale). Each selected
slice is

1. normalised to [0, 1] as the training data were (:func:`normalise_intensity`): for CT the HU window
   of the LIDC importer (HU clipped to [low, high], scaled linearly; default [-1000, 400]); for other
   modalities a per-slice percentile min-max (clip to the [low, high] percentiles, scale), like
   ``ambiseg_monai.preprocessing.common.normalise_minmax``; or nothing (``mode "none"``) for data already in [0, 1];
2. resampled (bilinear) to the model's spatial shape H' x W';

and the model's outputs come back to the slice grid H x W: binary masks with nearest-neighbour
interpolation, mean and variance maps bilinearly (:func:`resample_to_grid`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Resize

__all__ = [
    "CT_DEFAULT_WINDOW",
    "DEFAULT_PERCENTILES",
    "intensity_spec",
    "default_intensity_spec",
    "normalise_intensity",
    "resample_to_grid",
    "consensus_mask",
    "parse_slice_selection",
]

CT_DEFAULT_WINDOW = (-1000.0, 400.0)  # the LIDC importer's default HU window
DEFAULT_PERCENTILES = (0.5, 99.5)
INTENSITY_MODES = ("window", "percentile", "none")


def intensity_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an intensity specification and return it in canonical form.

    Forms: ``{"mode": "window", "window": [low, high]}`` (scanner units, e.g. HU),
    ``{"mode": "percentile", "percentiles": [low, high]}`` (per slice, in [0, 100]),
    ``{"mode": "none"}`` (the image is used as is).
    """
    mode = spec.get("mode")
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity mode must be one of {INTENSITY_MODES}, got {mode!r} in {dict(spec)}.")
    if mode == "none":
        return {"mode": "none"}
    key = "window" if mode == "window" else "percentiles"
    values = spec.get(key)
    if not isinstance(values, Sequence) or len(values) != 2:
        raise ValueError(f"intensity mode {mode!r} needs '{key}': [low, high], got {values!r}.")
    low, high = float(values[0]), float(values[1])
    if not low < high:
        raise ValueError(f"intensity '{key}' must have low < high, got [{low}, {high}].")
    if mode == "percentile" and not (0.0 <= low and high <= 100.0):
        raise ValueError(f"percentiles must lie in [0, 100], got [{low}, {high}].")
    return {"mode": mode, key: [low, high]}


def default_intensity_spec(modalities: Sequence[str]) -> dict[str, Any]:
    """The normalisation assumed when neither the user nor the bundle declares one (see module docstring)."""
    if [m.upper() for m in modalities] == ["CT"]:
        return {"mode": "window", "window": list(CT_DEFAULT_WINDOW)}
    return {"mode": "percentile", "percentiles": list(DEFAULT_PERCENTILES)}


def normalise_intensity(slices: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """S x H x W scanner values -> S x H x W float32 in [0, 1] (``"none"``: unchanged, as float32)."""
    spec = intensity_spec(spec)
    slices = np.asarray(slices, dtype=np.float32)
    if spec["mode"] == "none":
        return slices
    if spec["mode"] == "window":
        low, high = spec["window"]
        return np.clip((slices - low) / (high - low), 0.0, 1.0).astype(np.float32)
    out = np.zeros_like(slices)
    for i, image in enumerate(slices):  # per slice: one slice is one training image
        low, high = np.percentile(image, spec["percentiles"])
        if high > low:  # a constant slice stays all zeros
            out[i] = np.clip((image - low) / (high - low), 0.0, 1.0)
    return out


def resample_to_grid(images: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Resample S x C x H x W to S x C x size[0] x size[1].

    ``mode``: ``"bilinear"`` for images and soft maps, ``"nearest"`` for binary masks (stays binary).
    """
    if images.ndim != 4:
        raise ValueError(f"expected S x C x H x W, got shape {tuple(images.shape)}.")
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    interpolation = {"bilinear": "bilinear", "nearest": "nearest-exact"}[mode]
    resize = Resize(spatial_size=size, mode=interpolation, align_corners=False if mode == "bilinear" else None)
    # Resize works on one channel-first image; slices are independent
    return torch.stack([torch.as_tensor(resize(image)) for image in images.float()])


def consensus_mask(samples: torch.Tensor) -> torch.Tensor:
    """Majority vote over the sample axis: ... x N x H x W {0, 1} -> ... x H x W {0, 1}.

    A pixel is foreground when *more than half* of the N samples mark it (a tie, possible for even N,
    is background).
    """
    votes = samples.float().sum(dim=-3)
    return (2 * votes > samples.shape[-3]).to(torch.uint8)


def parse_slice_selection(selection: str | Sequence[int] | None, num_slices: int) -> list[int]:
    """Slice indices (0-based, in the volume's sorted order) from ``"all"``/None, ``"0,3,5-7"`` or a list.

    Raises:
        ValueError: an index outside ``[0, num_slices)``, a malformed range, or an empty selection.
    """
    if selection is None or (isinstance(selection, str) and selection.strip().lower() in ("", "all")):
        return list(range(num_slices))
    indices: list[int] = []
    if isinstance(selection, str):
        for part in selection.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    first, last = (int(p) for p in part.split("-"))
                    if last < first:
                        raise ValueError
                    indices.extend(range(first, last + 1))
                else:
                    indices.append(int(part))
            except ValueError:
                raise ValueError(
                    f"bad slice selection {selection!r}: use 'all' or comma-separated indices and ranges "
                    "like '0,3,5-7'."
                ) from None
    else:
        indices = [int(i) for i in selection]
    bad = [i for i in indices if not 0 <= i < num_slices]
    if bad:
        raise ValueError(f"slice indices {bad} are outside the volume, which has {num_slices} slice(s) (0-based).")
    if not indices:
        raise ValueError("the slice selection is empty.")
    return sorted(set(indices))
