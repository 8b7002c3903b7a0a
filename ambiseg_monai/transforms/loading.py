"""Loading contract files: images and rater stacks (C x H x W), and a known true rater distribution.

The data contract stores each 2D image or rater stack as an (H, W, 1, C) NIfTI file
(:mod:`ambiseg_monai.data.nifti`); :class:`LoadImage2D` reads it as C x H x W. :class:`LoadTruthd` loads the
demo dataset's stored true distribution (docs/demo_dataset.md) for the truth metrics.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import EnsureChannelFirst, MapTransform, Transform
from monai.transforms.io.array import switch_endianness
from monai.utils import ImageMetaKey
from monai.utils.type_conversion import convert_to_dst_type

from ambiseg_monai.transforms.keywise import KeywiseTransformd

__all__ = ["LoadImage2D", "LoadImage2Dd", "LoadTruthd"]


class LoadImage2D(Transform):
    """Load a contract file (image or rater stack) as a C x H x W ``MetaTensor``.

    Reads like MONAI's ``LoadImage(image_only=True, ensure_channel_first=True)`` with nibabel's reader (the
    same tensor and metadata) and removes the singleton third spatial axis of the contract's (H, W, 1, C)
    NIfTI layout (see :mod:`ambiseg_monai.data.nifti`). ``LoadImage`` itself is not used: it instantiates
    every default reader, and MONAI 1.6's nvImageCodec DICOM reader logs a warning and raises a
    ``UserWarning`` at construction wherever nvImageCodec is not installed (contract files are NIfTI).

    Args:
        dtype: output dtype (``np.float32`` for images and masks, so transforms can mix them).
    """

    def __init__(self, dtype: Any = np.float32) -> None:
        self.reader = NibabelReader()
        self.dtype = dtype

    def _load(self, filename: str) -> MetaTensor:
        array, meta = self.reader.get_data(self.reader.read(filename))
        array = convert_to_dst_type(array, dst=array, dtype=self.dtype)[0]
        meta = switch_endianness(meta, "<")
        meta[ImageMetaKey.FILENAME_OR_OBJ] = f"{filename}"
        image = EnsureChannelFirst()(MetaTensor.ensure_torch_and_prune_meta(array, meta), meta_dict=meta)
        if not isinstance(image, MetaTensor):  # a plain tensor only under monai.data.set_track_meta(False)
            image = MetaTensor(image, meta=meta)
        return image

    def __call__(self, filename: str) -> MetaTensor:
        try:
            image: Any = self._load(filename)  # MetaTensor (indexing keeps it one; its hints say Tensor)
        except Exception as error:
            raise ValueError(f"{filename}: cannot load image ({error})") from error
        while image.ndim > 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim != 3:
            raise ValueError(f"{filename}: expected a 2D image (C x H x W after loading), got {tuple(image.shape)}")
        return image


class LoadImage2Dd(KeywiseTransformd):
    """Dictionary version of :class:`LoadImage2D` (default keys: ``image`` and ``label``)."""

    def __init__(
        self, keys: KeysCollection = ("image", "label"), dtype: Any = np.float32, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, LoadImage2D(dtype=dtype), allow_missing_keys)


class LoadTruthd(MapTransform):
    """Load a known true rater distribution (the demo's ``truth`` entry) as padded tensors for a batch.

    A datalist item may carry ``truth = {"masks": <K x H x W file>, "probabilities": [K], ...}`` (the
    demo dataset does, see docs/demo_dataset.md). This writes, padded to fixed sizes so that items
    collate:

    - ``truth_modes``: ``max_modes`` x H x W float32 candidate masks (zeros when padded);
    - ``truth_probabilities``: (``max_modes``,) float64, 0 on padding; ``truth_mode_mask`` bool;
    - when the truth lists ``lobe_probabilities``: ``truth_regions`` (``max_regions`` x H x W, each
      lobe's pixels, see :func:`~ambiseg_monai.data.demo.lobe_regions`), ``truth_region_probabilities``
      and ``truth_region_mask``; zero regions otherwise.

    The raw entry is removed (its lists differ in length between items and would not collate). Items
    without the key pass through when ``allow_missing_keys`` (real datasets have no truth).

    Args:
        keys: the item key of the truth entry (default ``truth``).
        max_modes, max_regions: padded sizes (the demo has at most 5 modes and 2 lobes).
        prefix: prefix of the written keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "truth",
        max_modes: int = 8,
        max_regions: int = 4,
        prefix: str = "truth_",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_modes = int(max_modes)
        self.max_regions = int(max_regions)
        self.prefix = prefix
        self.loader = LoadImage2D(dtype=np.float32)

    def _pad(self, stack: np.ndarray, size: int, what: str, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        if stack.shape[0] > size:
            raise ValueError(f"{source}: the truth has {stack.shape[0]} {what}; raise max_{what} above {size}.")
        padded = np.zeros((size, *stack.shape[1:]), dtype=np.float32)
        padded[: stack.shape[0]] = stack
        present = torch.zeros(size, dtype=torch.bool)
        present[: stack.shape[0]] = True
        return torch.as_tensor(padded), present

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from ambiseg_monai.data.demo import lobe_regions  # the demo's naming of modes defines the lobes

        d = dict(data)
        for key in self.key_iterator(d):
            truth = d[key]
            if not isinstance(truth, Mapping) or "masks" not in truth or "probabilities" not in truth:
                raise ValueError(f"'{key}' must be a dict with 'masks' and 'probabilities' (see docs/demo_dataset.md).")
            source = str(truth["masks"])
            modes = np.asarray(self.loader(source)) > 0
            probabilities = np.asarray(truth["probabilities"], dtype=np.float64)
            if probabilities.shape != (modes.shape[0],):
                raise ValueError(f"{source}: {modes.shape[0]} masks but {probabilities.size} probabilities.")
            d[f"{self.prefix}modes"], d[f"{self.prefix}mode_mask"] = self._pad(modes, self.max_modes, "modes", source)
            p = torch.zeros(self.max_modes, dtype=torch.float64)
            p[: probabilities.size] = torch.as_tensor(probabilities)
            d[f"{self.prefix}probabilities"] = p
            lobes = list(truth.get("lobe_probabilities") or [])
            regions = (
                lobe_regions(modes, list(truth.get("modes", [])), len(lobes))
                if lobes
                else np.zeros((0, *modes.shape[1:]), dtype=bool)
            )
            d[f"{self.prefix}regions"], d[f"{self.prefix}region_mask"] = self._pad(
                regions, self.max_regions, "regions", source
            )
            q = torch.zeros(self.max_regions, dtype=torch.float64)
            q[: len(lobes)] = torch.as_tensor(lobes, dtype=torch.float64)
            d[f"{self.prefix}region_probabilities"] = q
            del d[key]
        return d
