"""Reading and writing the contract's 2D channel-first arrays as NIfTI files.

On disk a C x H x W array is stored as a NIfTI image of shape (H, W, 1, C): the two in-plane
axes first (NIfTI i = image row, j = image column), a singleton third spatial axis, and the
channels (image channels, or one channel per rater) on the fourth axis. With that layout
MONAI's ``LoadImage(ensure_channel_first=True)`` yields C x H x W x 1, which
:class:`ambiseg_monai.transforms.loading.LoadImage2D` squeezes to C x H x W, and viewers show one
2D slice with C "time points" instead of a C-slice volume.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["save_channel_first_nifti", "load_channel_first_nifti", "nifti_channel_first_shape"]


def save_channel_first_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Save a C x H x W array as an (H, W, 1, C) NIfTI file, keeping the array's dtype.

    Args:
        path: destination (``.nii`` or ``.nii.gz``).
        array: C x H x W array (float32 for images, uint8 for rater masks).
        affine: 4 x 4 voxel-to-world matrix; identity when omitted.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a C x H x W array, got shape {array.shape}")
    data = np.ascontiguousarray(np.transpose(array, (1, 2, 0))[:, :, None, :])
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    nib.save(image, os.fspath(path))


def _to_channel_first(data: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    if data.ndim == 2:  # a plain 2D image: one channel
        return data[None]
    if data.ndim == 3 and data.shape[2] == 1:  # (H, W, 1): one channel with a singleton slice axis
        return np.transpose(data, (2, 0, 1))
    if data.ndim == 4 and data.shape[2] == 1:  # the contract's (H, W, 1, C)
        return np.transpose(data[:, :, 0, :], (2, 0, 1))
    raise ValueError(f"{path}: expected a 2D NIfTI of shape (H, W, 1, C), got shape {data.shape}")


def load_channel_first_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a contract NIfTI file as a C x H x W array (dtype as stored) and its affine."""
    try:
        image = nib.load(os.fspath(path))
        data = np.asanyarray(image.dataobj)
    except FileNotFoundError:
        raise
    except Exception as error:  # nibabel raises several types for corrupt files
        raise ValueError(f"{path}: cannot read NIfTI file ({error})") from error
    return _to_channel_first(data, path), image.affine


def nifti_channel_first_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """C x H x W shape of a contract NIfTI file, read from its header only."""
    try:
        shape = nib.load(os.fspath(path)).shape
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: cannot read NIfTI header ({error})") from error
    channels, height, width = _to_channel_first(np.empty(shape, dtype=np.uint8), path).shape
    return int(channels), int(height), int(width)


def is_nifti_path(path: str | os.PathLike) -> bool:
    """Whether a file name has a NIfTI extension."""
    return Path(path).name.endswith((".nii", ".nii.gz"))
