"""Masks to and from the range diffusion runs in: [0, 1] <-> [-1, 1].

Diffusion models here generate masks in [-1, 1]: a training target (a mask or soft mask in [0, 1]) is
scaled by ``2 x - 1`` (:class:`MaskToSymmetric`, :func:`mask_to_symmetric`), and a sample is binarised
back with ``x > 0`` (:class:`SymmetricToMask`).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Transform

from ambiseg_monai.transforms.keywise import KeywiseTransformd

__all__ = ["mask_to_symmetric", "MaskToSymmetric", "MaskToSymmetricd", "SymmetricToMask", "SymmetricToMaskd"]

ArrayLike = torch.Tensor | np.ndarray


def mask_to_symmetric(mask: torch.Tensor) -> torch.Tensor:
    """A mask (or soft mask) in [0, 1] -> the diffusion range [-1, 1] (0 -> -1, 1 -> +1)."""
    mask = mask.float()
    low, high = float(mask.min()), float(mask.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"training targets must be masks in [0, 1] (they are mapped to [-1, 1] here); "
            f"got values in [{low}, {high}]."
        )
    return 2.0 * mask - 1.0


class MaskToSymmetric(Transform):
    """Scale a mask from [0, 1] to [-1, 1] (``2 x - 1``): the space masks are diffused in."""

    def __call__(self, mask: ArrayLike) -> ArrayLike:
        return mask * 2.0 - 1.0


class SymmetricToMask(Transform):
    """Binarise a [-1, 1] sample back to a {0, 1} mask with ``x > threshold`` (default 0)."""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = threshold

    def __call__(self, sample: ArrayLike) -> ArrayLike:
        binary = sample > self.threshold
        return binary.astype(np.float32) if isinstance(binary, np.ndarray) else binary.float()


class MaskToSymmetricd(KeywiseTransformd):
    """Dictionary version of :class:`MaskToSymmetric` (default key ``target``)."""

    def __init__(self, keys: KeysCollection = "target", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, MaskToSymmetric(), allow_missing_keys)


class SymmetricToMaskd(KeywiseTransformd):
    """Dictionary version of :class:`SymmetricToMask` (default key ``pred``)."""

    def __init__(self, keys: KeysCollection = "pred", threshold: float = 0.0, allow_missing_keys: bool = False):
        super().__init__(keys, SymmetricToMask(threshold), allow_missing_keys)
