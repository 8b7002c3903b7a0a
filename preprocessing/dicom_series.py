"""Reading a CT series from a folder of DICOM files with pydicom.

Headers of every file are read first (no pixel data); slices are ordered by their position along
the slice normal (``ImagePositionPatient`` projected on the cross product of the
``ImageOrientationPatient`` row and column directions), never by file name or instance number.
Two files at the same position (LIDC has a few re-sent slices) are duplicates: the first by
``InstanceNumber`` is kept and the other's SOP Instance UID is mapped to the kept slice, so
annotations referring to either still find their slice. Pixel data are then read on demand, one
slice at a time, and converted to Hounsfield units with ``RescaleSlope``/``RescaleIntercept``,
so memory holds the headers plus the slices actually needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .common import InputError, check_finite

__all__ = ["DicomSeriesError", "CTSlice", "CTSeries", "read_series", "read_header", "list_dicom_files"]

# A position difference below this (mm) means "same slice".
DUPLICATE_TOLERANCE_MM = 1e-3


class DicomSeriesError(InputError):
    """A DICOM file or series is missing, corrupt or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class CTSlice:
    """One slice of a series: its file, identity and position (mm along the slice normal)."""

    path: str
    sop_instance_uid: str
    position: float
    z: float  # ImagePositionPatient[2], the value LIDC's XML calls imageZposition
    instance_number: int


@dataclass
class CTSeries:
    """The geometry of a CT series and lazy access to its slices in HU.

    Attributes:
        series_instance_uid, study_instance_uid, patient_id: identity (from the first slice).
        slices: slices ordered by position along the slice normal (duplicates removed).
        pixel_spacing: (row spacing, column spacing) in mm.
        slice_spacing: median distance between consecutive slices in mm.
        shape: (rows, columns) of every slice.
        sop_to_index: SOP Instance UID -> index in ``slices`` (duplicates map to the kept slice).
        warnings: what was noticed and handled (duplicates, gaps, other series in the folder).
    """

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    slices: list[CTSlice]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    shape: tuple[int, int]
    sop_to_index: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    def index_of_z(self, z: float, tolerance: float | None = None) -> int | None:
        """The slice at ``z`` (ImagePositionPatient[2]) within ``tolerance`` mm (half a slice by default)."""
        if not self.slices:
            return None
        tolerance = 0.5 * self.slice_spacing if tolerance is None else tolerance
        distances = np.abs(np.array([s.z for s in self.slices]) - z)
        best = int(np.argmin(distances))
        return best if distances[best] <= tolerance else None

    def read_hu(self, index: int) -> np.ndarray:
        """Slice ``index`` as a rows x columns float32 array in Hounsfield units."""
        path = self.slices[index].path
        try:
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
        except FileNotFoundError as error:
            raise DicomSeriesError(f"{path}: DICOM file disappeared while reading the series") from error
        except Exception as error:  # pydicom raises many types for truncated/compressed data
            raise DicomSeriesError(f"{path}: cannot decode pixel data ({error})") from error
        if pixels.shape != self.shape:
            raise DicomSeriesError(f"{path}: slice is {pixels.shape}, the series is {self.shape}")
        slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
        hu = (pixels.astype(np.float32) * slope + intercept).astype(np.float32)
        check_finite(hu, path, "slice (in HU)")  # float pixel data or a NaN rescale tag
        return hu


def list_dicom_files(directory: str | os.PathLike) -> list[Path]:
    """The DICOM files directly inside ``directory`` (``*.dcm``, or files without an extension)."""
    directory = Path(directory)
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and (path.suffix.lower() == ".dcm" or (path.suffix == "" and not path.name.startswith(".")))
    )


def read_header(path: str | os.PathLike) -> pydicom.Dataset:
    """Read a DICOM header without pixel data; :class:`DicomSeriesError` names a corrupt file."""
    try:
        return pydicom.dcmread(os.fspath(path), stop_before_pixels=True)
    except FileNotFoundError as error:
        raise DicomSeriesError(f"{path}: DICOM file not found") from error
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as error:
        raise DicomSeriesError(f"{path}: not a readable DICOM file ({error})") from error


def _required(dataset: pydicom.Dataset, keyword: str, path: Path):
    value = getattr(dataset, keyword, None)
    if value is None or value == "":
        raise DicomSeriesError(f"{path}: DICOM tag {keyword} is missing")
    return value


def read_series(directory: str | os.PathLike, series_instance_uid: str | None = None) -> CTSeries:
    """Read the headers of a series in ``directory`` and order its slices.

    Args:
        directory: folder holding the series' files.
        series_instance_uid: the series to read; files of other series in the same folder are
            ignored (with a warning). When omitted, the folder must hold one series.

    Raises:
        DicomSeriesError: a corrupt file, a missing geometry tag, slices of different sizes or
            orientations, or no file of the series.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DicomSeriesError(f"{directory}: DICOM folder not found")
    warnings: list[str] = []
    headers: list[tuple[Path, pydicom.Dataset]] = []
    other_series = 0
    for path in list_dicom_files(directory):
        dataset = read_header(path)
        uid = str(getattr(dataset, "SeriesInstanceUID", ""))
        if series_instance_uid is None:
            series_instance_uid = uid
        if uid != series_instance_uid:
            other_series += 1
            continue
        headers.append((path, dataset))
    if not headers:
        raise DicomSeriesError(f"{directory}: no DICOM file of series {series_instance_uid}")
    if other_series:
        warnings.append(f"{directory}: ignored {other_series} files of other series")

    first_path, first = headers[0]
    orientation = np.asarray(_required(first, "ImageOrientationPatient", first_path), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    spacing = tuple(float(v) for v in _required(first, "PixelSpacing", first_path))
    shape = (int(_required(first, "Rows", first_path)), int(_required(first, "Columns", first_path)))

    slices: list[CTSlice] = []
    for path, dataset in headers:
        slice_orientation = np.asarray(_required(dataset, "ImageOrientationPatient", path), dtype=float)
        if not np.allclose(slice_orientation, orientation, atol=1e-4):
            raise DicomSeriesError(f"{path}: ImageOrientationPatient differs from {first_path}")
        if (int(_required(dataset, "Rows", path)), int(_required(dataset, "Columns", path))) != shape:
            raise DicomSeriesError(f"{path}: slice size differs from {first_path} ({shape[0]} x {shape[1]})")
        position = np.asarray(_required(dataset, "ImagePositionPatient", path), dtype=float)
        slices.append(
            CTSlice(
                path=os.fspath(path),
                sop_instance_uid=str(_required(dataset, "SOPInstanceUID", path)),
                position=float(position @ normal),
                z=float(position[2]),
                instance_number=int(getattr(dataset, "InstanceNumber", 0) or 0),
            )
        )
    slices.sort(key=lambda s: (s.position, s.instance_number, s.path))

    kept: list[CTSlice] = []
    sop_to_index: dict[str, int] = {}
    for current in slices:
        if kept and abs(current.position - kept[-1].position) < DUPLICATE_TOLERANCE_MM:
            warnings.append(
                f"{current.path}: duplicate slice at {current.position:.2f} mm (kept {Path(kept[-1].path).name})"
            )
            sop_to_index[current.sop_instance_uid] = len(kept) - 1
            continue
        kept.append(current)
        sop_to_index[current.sop_instance_uid] = len(kept) - 1

    steps = np.diff([s.position for s in kept])
    slice_spacing = float(np.median(steps)) if steps.size else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    if steps.size and np.any(steps > 1.5 * slice_spacing):
        gaps = int(np.sum(steps > 1.5 * slice_spacing))
        warnings.append(f"{directory}: {gaps} gap(s) in slice positions (missing files?)")

    return CTSeries(
        series_instance_uid=str(series_instance_uid),
        study_instance_uid=str(getattr(first, "StudyInstanceUID", "")),
        patient_id=str(getattr(first, "PatientID", "")),
        slices=kept,
        pixel_spacing=(spacing[0], spacing[1]),
        slice_spacing=slice_spacing,
        shape=shape,
        sop_to_index=sop_to_index,
        warnings=warnings,
    )
