"""AmbDiffSeg's relative-area filter: function, MONAI array transform and dict transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from ambiseg_monai.transforms import RelativeAreaFilter, RelativeAreaFilterd, relative_area_filter


def samples_with_areas(*areas: int, size: int = 4) -> torch.Tensor:
    """N x size x size float samples whose foreground areas are ``areas`` (first pixels in raster order)."""
    out = torch.zeros(len(areas), size * size)
    for i, area in enumerate(areas):
        out[i, :area] = 1
    return out.view(len(areas), size, size)


def areas(samples: torch.Tensor) -> list[int]:
    return (samples != 0).flatten(-2).sum(-1).flatten().tolist()


def test_filter_empties_samples_below_r_times_largest():
    batch = torch.stack([samples_with_areas(8, 4, 3, 0), samples_with_areas(2, 2, 1, 1)])
    out = relative_area_filter(batch, r=0.5)
    # image 1: largest 8 -> keep area >= 4; image 2: largest 2 -> keep area >= 1 (all)
    assert areas(out) == [8, 4, 0, 0, 2, 2, 1, 1]
    assert out.dtype == batch.dtype and out.shape == batch.shape
    # kept samples are unchanged, not just of equal area
    assert torch.equal(out[0, :2], batch[0, :2])
    # r = 0 keeps everything, r = 1 keeps only the largest samples
    assert torch.equal(relative_area_filter(batch, r=0.0), batch)
    assert areas(relative_area_filter(batch, r=1.0)) == [8, 0, 0, 0, 2, 2, 0, 0]


def test_filter_keeps_all_empty_images_and_dtypes():
    empty = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    assert torch.equal(relative_area_filter(empty), empty)
    as_bool = torch.stack([samples_with_areas(8, 3)]).bool()
    out = relative_area_filter(as_bool)
    assert out.dtype == torch.bool and areas(out) == [8, 0]
    as_uint8 = as_bool.to(torch.uint8)
    assert relative_area_filter(as_uint8).dtype == torch.uint8


def test_array_and_dict_transforms():
    samples = samples_with_areas(8, 4, 3)
    out = RelativeAreaFilter(r=0.5)(samples)  # one image: N x H x W
    assert areas(out) == [8, 4, 0]
    as_numpy = RelativeAreaFilter(r=0.5)(samples.numpy())
    assert isinstance(as_numpy, np.ndarray) and areas(torch.from_numpy(as_numpy)) == [8, 4, 0]
    meta = MetaTensor(samples, meta={"filename_or_obj": "case_7"})
    out_meta = RelativeAreaFilter()(meta)
    assert isinstance(out_meta, MetaTensor) and out_meta.meta["filename_or_obj"] == "case_7"
    data = Compose([RelativeAreaFilterd(keys="pred", r=0.5)])({"pred": samples, "label": samples})
    assert areas(data["pred"]) == [8, 4, 0] and torch.equal(data["label"], samples)


def test_bad_arguments():
    with pytest.raises(ValueError, match="r: relative area threshold"):
        relative_area_filter(torch.zeros(1, 2, 4, 4), r=1.5)
    with pytest.raises(ValueError, match="B x N x H x W"):
        relative_area_filter(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="N x H x W samples"):
        RelativeAreaFilter()(torch.zeros(4, 4))
