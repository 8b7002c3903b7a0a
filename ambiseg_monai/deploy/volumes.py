"""Volumes on disk: the NIfTI grid of a DICOM series, NIfTI reading and writing.

In memory a volume is D x H x W (slices, rows, columns), as the MONAI Deploy SDK builds it from a
series. On disk (NIfTI) the same voxels are stored X x Y x Z = W x H x D (``volume.transpose(2, 1, 0)``)
with a RAS affine, so the outputs overlay the input in any NIfTI viewer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import pydicom

__all__ = ["series_affine", "read_nifti_volume", "write_nifti_volume"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_affine(datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """RAS affine (4 x 4) of a series whose slices are ``datasets`` in volume order.

    Maps NIfTI voxel indices (column i, row j, slice k) to RAS millimetres: from ImagePositionPatient
    of the first slice, ImageOrientationPatient, PixelSpacing and the step between the first and the
    last slice (SliceThickness, or 1 mm, along the slice normal for a single slice).

    Raises:
        ValueError: a slice lacks the geometry attributes (ImagePositionPatient, ImageOrientationPatient,
            PixelSpacing).
    """
    first = datasets[0]
    for attribute in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if attribute not in first:
            raise ValueError(f"DICOM slice {first.get('SOPInstanceUID', '?')} has no {attribute}: no geometry.")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, dtype=np.float64)
    if len(datasets) > 1:
        last = np.asarray(datasets[-1].ImagePositionPatient, dtype=np.float64)
        slice_step = (last - origin) / (len(datasets) - 1)
    else:
        thickness = float(first.get("SliceThickness") or 1.0)
        slice_step = np.cross(row_cosine, column_cosine) * thickness
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * column_spacing  # i: along a row (next column)
    lps[:3, 1] = column_cosine * row_spacing  # j: down a column (next row)
    lps[:3, 2] = slice_step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def read_nifti_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 2D/3D NIfTI image -> (D x H x W float32 volume, 4 x 4 affine).

    Raises:
        ValueError: the file cannot be read as NIfTI, or it has more than one channel/time point.
    """
    try:
        image = nib.load(os.fspath(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise ValueError(f"cannot read NIfTI file {path}: {error}") from error
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ValueError(
            f"NIfTI file {path} has shape {data.shape}; the deploy app takes one 2D or 3D single-channel image."
        )
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(image.affine, dtype=np.float64)


def write_nifti_volume(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray) -> None:
    """Write D x H x W (or D x H x W x N: one map per sample) with ``affine``; dtype is kept."""
    volume = np.asarray(volume)
    axes = (2, 1, 0) if volume.ndim == 3 else (2, 1, 0, 3)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.transpose(axes)), affine), os.fspath(path))
