"""What the deploy application is given: a DICOM folder or a NIfTI file, checked before the graph runs.

:func:`describe_input` reads headers only (no pixel data), so a folder without DICOM, a study without
a series of an accepted modality, or an unreadable NIfTI fails in a second with a message naming the
path and the problem, instead of deep inside the Holoscan graph.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

__all__ = ["InputDescription", "describe_input", "is_nifti_path", "resolve_model_path"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass
class InputDescription:
    """The kind of input and, for DICOM, the series found (uid -> (modality, number of instances))."""

    kind: str  # "dicom" or "nifti"
    path: Path
    series: dict[str, tuple[str, int]] = field(default_factory=dict)
    accepted_series: list[str] = field(default_factory=list)


def _dicom_headers(folder: Path) -> tuple[list[pydicom.Dataset], int]:
    headers: list[pydicom.Dataset] = []
    looked_at = 0
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            looked_at += 1
            try:
                headers.append(pydicom.dcmread(Path(root) / name, stop_before_pixels=True))
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue  # not DICOM (or unreadable): the loader skips such files too
    return headers, looked_at


def describe_input(path: str | os.PathLike, modalities: list[str] | tuple[str, ...]) -> InputDescription:
    """Check the application input and describe it.

    Args:
        path: a folder of DICOM files (any depth) or a ``.nii``/``.nii.gz`` file.
        modalities: accepted image modalities (e.g. ``["CT"]``) for DICOM input.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: no DICOM files in the folder; no image series of an accepted modality (the
            message lists the series found); a file that is neither a folder nor NIfTI.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        if not is_nifti_path(path):
            raise ValueError(
                f"input {path} is a file but not NIfTI (.nii/.nii.gz); give a NIfTI file or a DICOM folder."
            )
        return InputDescription("nifti", path)
    headers, looked_at = _dicom_headers(path)
    if not headers:
        raise ValueError(f"no DICOM files found in {path} ({looked_at} file(s) looked at).")
    counts: Counter = Counter()
    modality_of: dict[str, str] = {}
    has_pixels: dict[str, bool] = defaultdict(bool)
    for header in headers:
        uid = str(header.get("SeriesInstanceUID", "?"))
        counts[uid] += 1
        modality_of[uid] = str(header.get("Modality", "?"))
        has_pixels[uid] |= "Rows" in header and "Columns" in header
    series = {uid: (modality_of[uid], counts[uid]) for uid in counts}
    wanted = {m.upper() for m in modalities}
    accepted = [uid for uid, (modality, _) in series.items() if modality.upper() in wanted and has_pixels[uid]]
    if not accepted:
        found = "; ".join(f"{uid} (modality {m}, {n} instance(s))" for uid, (m, n) in series.items())
        raise ValueError(
            f"no {'/'.join(sorted(wanted))} image series in {path}: the model accepts {sorted(wanted)}, found {found}."
        )
    return InputDescription("dicom", path, series, accepted)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The exported model file: ``path`` itself, or the single ``.ts`` inside a models folder.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without a ``.ts`` file.
        ValueError: a folder with several ``.ts`` files.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path} (export one with `ambiseg export ... --out {path}`).")
    candidates = sorted(path.rglob("*.ts"))
    if not candidates:
        raise FileNotFoundError(f"model folder {path} holds no .ts file (export one with `ambiseg export`).")
    if len(candidates) > 1:
        raise ValueError(f"model folder {path} holds several .ts files ({[str(c) for c in candidates]}); name one.")
    return candidates[0]
