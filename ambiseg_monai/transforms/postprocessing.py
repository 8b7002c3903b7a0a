"""AmbDiffSeg's relative-area post-processing: empty every sample much smaller than the image's largest one.

A sample whose foreground area is below ``r`` times the largest sample's area (of the same image) is set to
empty; r = 0.5 in the paper. Samples of an image whose samples are all empty are left unchanged.
Available as a function on B x N x H x W stacks and as MONAI array / dict transforms on one image's
N x H x W sample stack (the channel dimension holds the samples), e.g. as an evaluator post-transform.
"""

from __future__ import annotations

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from ambiseg_monai.transforms.keywise import KeywiseTransformd

__all__ = ["relative_area_filter", "RelativeAreaFilter", "RelativeAreaFilterd"]


def relative_area_filter(preds: torch.Tensor, r: float = 0.5) -> torch.Tensor:
    """Empty the samples whose area is below ``r`` times the largest sample area of their image.

    Args:
        preds: B x N x H x W binary samples (bool or {0, 1} numeric); values other than 0 count as foreground.
        r: relative area threshold in [0, 1].

    Returns:
        Tensor like ``preds`` (same dtype and device) with the small samples set to 0.
    """
    if not 0 <= r <= 1:
        raise ValueError(f"r: relative area threshold must lie in [0, 1], got {r}.")
    if not isinstance(preds, torch.Tensor) or preds.ndim != 4:
        shape = tuple(preds.shape) if hasattr(preds, "shape") else type(preds).__name__
        raise ValueError(f"preds: expected a B x N x H x W tensor, got {shape}.")
    area = (preds != 0).flatten(2).sum(-1)  # B x N
    largest = area.amax(dim=1, keepdim=True)
    keep = area.to(torch.float64) >= r * largest.to(torch.float64)
    keep = keep[:, :, None, None]
    return preds & keep if preds.dtype == torch.bool else preds * keep.to(preds.dtype)


class RelativeAreaFilter(Transform):
    """Array transform: relative-area filter of one image's N x H x W samples (or a B x N x H x W batch).

    Args:
        r: relative area threshold (samples with area < r x largest area are emptied).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, r: float = 0.5) -> None:
        if not 0 <= r <= 1:
            raise ValueError(f"r: relative area threshold must lie in [0, 1], got {r}.")
        self.r = r

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        samples = convert_to_tensor(img, track_meta=False)
        if samples.ndim == 3:
            filtered = relative_area_filter(samples[None], self.r)[0]
        elif samples.ndim == 4:
            filtered = relative_area_filter(samples, self.r)
        else:
            raise ValueError(
                f"RelativeAreaFilter expects N x H x W samples or a B x N x H x W batch, got {tuple(samples.shape)}."
            )
        out, *_ = convert_to_dst_type(filtered, img)
        return out


class RelativeAreaFilterd(KeywiseTransformd):
    """Dict version of :class:`RelativeAreaFilter` (default key ``"pred"``)."""

    backend = RelativeAreaFilter.backend

    def __init__(self, keys: KeysCollection = "pred", r: float = 0.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, RelativeAreaFilter(r), allow_missing_keys)
