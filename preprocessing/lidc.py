"""Convert an LIDC-IDRI download from TCIA (DICOM CT series + XML annotations) to the standard 2D
multi-rater format: one sample per nodule slice, a crop centred on the nodule, one mask per reader.

Usage::

    ambiseg prepare lidc --source LIDC-IDRI/ --out data/lidc [--xml-dir tcia-lidc-xml/] [--workers 4]

What is done, per CT series that has an annotation file:

* slices are read with pydicom, ordered by position, duplicates dropped, converted to HU;
* every reader's ``unblindedReadNodule`` marks are parsed (point-only marks of nodules < 3 mm are
  skipped and counted); marks of the same nodule by different readers are grouped
  (:mod:`ambiseg_monai.preprocessing.nodule_grouping`);
* for every slice where at least one reader of a nodule drew a contour, a ``crop_size`` square
  centred on the nodule's bounding-box centre (the same centre for all its slices) is cut out,
  optionally resampled to an isotropic in-plane pixel spacing; pixels beyond the scan are air
  (-1000 HU);
* the image is HU clipped to the window (default [-1000, 400]) and scaled to [0, 1];
* the label holds one mask per reading session, in the XML's session order (missing readers
  and readers who did not mark the nodule give empty masks), rasterised from the contours on the
  crop grid (:mod:`ambiseg_monai.preprocessing.contours`): the pixels strictly inside each outline, since the
  readers drew the outline just outside the nodule (pylidc's default); holes are cut out with
  their outlines. ``--include-outline`` counts the outline pixels as nodule instead;
* splits are by patient, seeded (60/20/20 by default).

Item metadata: ``series_uid``, ``study_uid``, ``nodule`` (index in the scan), ``slice_index``,
``z_position`` (mm), ``reader_ids`` (radiologist id per mask channel, null for padding),
``reader_nodule_ids`` (the XML noduleID per channel, null when that reader did not mark it),
``pixel_spacing`` (mm, of the crop).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import map_coordinates
from tqdm import tqdm

from ambiseg_monai.data.datalist import split_patients

from . import common
from .contours import rasterise_contours
from .dicom_series import CTSeries, DicomSeriesError, read_header, read_series
from .lidc_xml import LidcXmlError, NoduleMark, ReadingSession, parse_lidc_xml, read_xml_header
from .nodule_grouping import group_marks

__all__ = [
    "LidcOptions",
    "ScanTask",
    "ScanResult",
    "discover_scans",
    "process_scan",
    "prepare_lidc",
    "configure_parser",
    "main",
]

AIR_HU = -1000.0


@dataclass(frozen=True)
class LidcOptions:
    """Choices of the LIDC conversion (recorded in the datalist and the summary).

    Attributes:
        crop_size: side of the square crop (pixels).
        spacing: in-plane pixel spacing (mm) to resample to; None keeps the scan's own.
        window: (lower, upper) HU window mapped to [0, 1].
        num_readers: mask channels per sample (readers beyond this add channels).
        group_tolerance: largest distance (mm) between two readers' contours of the same nodule;
            None uses the series' slice spacing.
        min_readers: keep nodules marked (with a contour) by at least this many readers.
        include_outline: count the ``edgeMap`` outline pixels as part of the nodule (default
            False: the readers drew the outline just outside the nodule, so the mask is the pixels
            strictly inside it, as pylidc's ``include_contour_points=False``).
    """

    crop_size: int = 128
    spacing: float | None = None
    window: tuple[float, float] = (-1000.0, 400.0)
    num_readers: int = 4
    group_tolerance: float | None = None
    min_readers: int = 1
    include_outline: bool = False


@dataclass(frozen=True)
class ScanTask:
    """One CT series to convert: where its files are and how its cases are named."""

    series_uid: str
    patient_id: str
    dicom_dir: str
    xml_paths: tuple[str, ...]
    case_prefix: str
    options: LidcOptions


@dataclass
class ScanResult:
    """A converted scan: its samples (split not yet assigned), warnings and counters."""

    samples: list[common.Sample]
    warnings: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


# -- one scan --------------------------------------------------------------------------------------
def _slice_of_roi(series: CTSeries, roi, xml_path: str, where: str, warnings: list[str]) -> int:
    index = series.sop_to_index.get(roi.sop_instance_uid)
    if index is not None:
        return index
    index = series.index_of_z(roi.z)
    if index is None:
        raise LidcXmlError(
            f"{xml_path}: {where}: imageSOP_UID {roi.sop_instance_uid} (z = {roi.z:g} mm) matches no slice "
            f"of series {series.series_instance_uid} in {Path(series.slices[0].path).parent}"
        )
    warnings.append(f"{xml_path}: {where}: unknown imageSOP_UID {roi.sop_instance_uid}, matched by z = {roi.z:g} mm")
    return index


def _sessions_of(xml_paths: tuple[str, ...], series_uid: str) -> list[tuple[str, ReadingSession]]:
    """All reading sessions of the series' annotation files, renumbered in file order."""
    sessions: list[tuple[str, ReadingSession]] = []
    for xml_path in xml_paths:
        annotation = parse_lidc_xml(xml_path)
        if annotation.series_instance_uid != series_uid:
            raise LidcXmlError(f"{xml_path}: annotates series {annotation.series_instance_uid}, expected {series_uid}")
        for session in annotation.sessions:
            index = len(sessions)
            session.reader_index = index
            for mark in session.marks:
                mark.reader_index = index
            sessions.append((xml_path, session))
    return sessions


def _crop_grid(centre: np.ndarray, size: int, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Origin (row, column) of the crop in scan pixels, and its pixel coordinates (2 x S x S).

    ``step``: (row, column) distance between crop pixels, in scan pixels (1: no resampling).
    """
    origin = centre - (size / 2.0) * step
    if np.all(step == 1.0):
        origin = np.rint(origin)  # an integer shift: the crop copies scan pixels exactly
    offsets = np.arange(size, dtype=float)
    rows, columns = np.meshgrid(origin[0] + offsets * step[0], origin[1] + offsets * step[1], indexing="ij")
    return origin, np.stack([rows, columns])


@dataclass
class _ContourMark:
    """A reader's mark with a contour, with the slice index of each of its rois."""

    mark: NoduleMark
    slices: list[int]

    def points_mm(self, series: CTSeries) -> np.ndarray:
        """All contour points as P x 3 (row, column, position along the slice normal) in mm."""
        spacing = np.asarray(series.pixel_spacing, dtype=float)
        return np.concatenate(
            [
                np.column_stack([roi.points * spacing, np.full(len(roi.points), series.slices[k].position)])
                for roi, k in zip(self.mark.rois, self.slices, strict=True)
            ]
        )


def _contour_marks(
    series: CTSeries, sessions: list[tuple[str, ReadingSession]], result: ScanResult
) -> list[_ContourMark]:
    """The marks that have a contour (point-only marks are counted and dropped), rois located."""
    marks = []
    for xml_path, session in sessions:
        for mark in session.marks:
            if mark.point_only:
                result.counts["point_only_marks_skipped"] += 1
                continue
            where = f"reading session {session.reader_index + 1}, nodule '{mark.nodule_id}'"
            slices = [_slice_of_roi(series, roi, xml_path, where, result.warnings) for roi in mark.rois]
            marks.append(_ContourMark(mark, slices))
    result.counts["contour_marks"] += len(marks)
    return marks


def _nodule_labels(
    nodule: dict[int, _ContourMark], num_channels: int, grid: np.ndarray, include_outline: bool = False
) -> dict[int, np.ndarray]:
    """Slice index -> R x S x S masks of one nodule (``nodule``: reader index -> mark), on the crop grid.

    ``grid`` (2 x S x S) holds the scan (row, column) coordinates of the crop's pixels. The contours
    are rasterised on the scan's own pixel grid (under the crop, plus a margin), where the outline
    is one scan pixel wide as the reader drew it, and then sampled at the crop's pixel centres
    (nearest scan pixel): with ``--spacing`` the outline is still removed (or added) at the scan's
    resolution, not as a band of resampled pixels. Without resampling the sampling is exact.
    """
    size = grid.shape[1]
    low = np.floor(grid.reshape(2, -1).min(axis=1)).astype(int) - 1
    box = tuple(int(v) for v in np.ceil(grid.reshape(2, -1).max(axis=1)).astype(int) + 2 - low)
    rows, columns = np.rint(grid - low[:, None, None]).astype(int)
    slices = sorted({k for m in nodule.values() for roi, k in zip(m.mark.rois, m.slices, strict=True) if roi.inclusion})
    labels = {}
    for k in slices:
        label = np.zeros((num_channels, size, size), dtype=np.uint8)
        for reader, m in nodule.items():
            contours = [
                (roi.points - low, roi.inclusion) for roi, s in zip(m.mark.rois, m.slices, strict=True) if s == k
            ]
            if contours:
                label[reader] = rasterise_contours(contours, box, include_outline)[rows, columns]
        labels[k] = label
    return labels


def process_scan(task: ScanTask) -> ScanResult:
    """Convert one CT series: read, parse, group, crop and rasterise (runs in a worker process).

    Raises:
        DicomSeriesError, LidcXmlError: naming the DICOM or XML file at fault.
    """
    options = task.options
    series = read_series(task.dicom_dir, task.series_uid)
    result = ScanResult(samples=[], warnings=list(series.warnings))
    sessions = _sessions_of(task.xml_paths, task.series_uid)
    num_channels = max(options.num_readers, len(sessions))
    marks = _contour_marks(series, sessions, result)
    if not marks:
        return result
    tolerance = options.group_tolerance if options.group_tolerance is not None else series.slice_spacing
    groups = group_marks([m.points_mm(series) for m in marks], [m.mark.reader_index for m in marks], tolerance)

    pixel_spacing = np.asarray(series.pixel_spacing, dtype=float)
    step = np.ones(2) if options.spacing is None else float(options.spacing) / pixel_spacing
    crop_spacing = pixel_spacing * step
    affine = np.diag([crop_spacing[0], crop_spacing[1], series.slice_spacing, 1.0])
    reader_ids = [sessions[r][1].radiologist_id if r < len(sessions) else None for r in range(num_channels)]
    low, high = options.window
    nodule_number = 0
    for group in groups:
        nodule = {marks[m].mark.reader_index: marks[m] for m in group}
        if len(nodule) < options.min_readers:
            result.counts["nodules_below_min_readers"] += 1
            continue
        nodule_number += 1
        result.counts["nodules"] += 1
        outline = np.concatenate([roi.points for m in nodule.values() for roi in m.mark.rois if roi.inclusion])
        centre = (outline.min(axis=0) + outline.max(axis=0)) / 2.0  # the same for all slices of the nodule
        _, grid = _crop_grid(centre, options.crop_size, step)
        labels = _nodule_labels(nodule, num_channels, grid, options.include_outline)
        for k, label in labels.items():
            if not label.any():  # e.g. only a hole drawn on this slice, or an outline with no pixel inside
                result.counts["slices_without_foreground"] += 1
                continue
            hu = map_coordinates(series.read_hu(k), grid, order=1, mode="constant", cval=AIR_HU)
            result.samples.append(
                common.Sample(
                    case_id=f"{task.case_prefix}_n{nodule_number:02d}_k{k:03d}",
                    patient_id=task.patient_id,
                    image=np.clip((hu - low) / (high - low), 0.0, 1.0).astype(np.float32)[None],
                    label=label,
                    affine=affine,
                    metadata={
                        "series_uid": task.series_uid,
                        "study_uid": series.study_instance_uid,
                        "nodule": nodule_number,
                        "slice_index": int(k),
                        "z_position": float(series.slices[k].z),
                        "reader_ids": reader_ids,
                        "reader_nodule_ids": [
                            nodule[r].mark.nodule_id if r in nodule else None for r in range(num_channels)
                        ],
                        "pixel_spacing": [float(v) for v in crop_spacing],
                    },
                )
            )
    return result


# -- finding the scans -----------------------------------------------------------------------------
def _series_header(directory: Path, files: list[Path]) -> tuple[object | None, str | None]:
    """The first readable header of a folder's DICOM files (or None and the last error)."""
    error = None
    for path in files[:5]:
        try:
            return read_header(path), None
        except DicomSeriesError as exc:
            error = str(exc)
    return None, error


def discover_scans(
    source: str | os.PathLike,
    options: LidcOptions,
    xml_dirs: tuple[str | os.PathLike, ...] = (),
    summary: common.ImportSummary | None = None,
    strict: bool = False,
    progress: bool = False,
) -> list[ScanTask]:
    """Walk a TCIA download and pair each CT series with its annotation file(s).

    DICOM files are the ``*.dcm`` files of a folder (one series per folder, as TCIA delivers them);
    annotation files are all ``*.xml`` under ``source`` and ``xml_dirs`` (the separate XML-only
    archive), matched to series by the ``SeriesInstanceUid`` in their header. X-ray annotation
    files and non-CT series are skipped; unreadable ones, CT annotation files whose header is
    malformed or lacks the series UID, are reported, counted (``annotation_files_skipped``) and
    listed in the summary, or fatal with ``strict``.
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: LIDC source folder not found")
    summary = summary if summary is not None else common.ImportSummary("lidc")

    dicom_dirs: dict[Path, list[Path]] = {}
    xml_files: list[Path] = []
    for root in (source, *map(Path, xml_dirs)):
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: folder not found")
        for folder, _, names in os.walk(root):
            for name in sorted(names):
                lower = name.lower()
                if lower.endswith(".xml"):
                    xml_files.append(Path(folder) / name)
                elif lower.endswith(".dcm") and root == source:
                    dicom_dirs.setdefault(Path(folder), []).append(Path(folder) / name)
    if not dicom_dirs:
        raise FileNotFoundError(f"{source}: no DICOM (*.dcm) files found")

    annotations: dict[str, list[str]] = defaultdict(list)
    for path in tqdm(sorted(set(xml_files)), desc="reading XML headers", disable=not progress, unit="file"):
        try:
            header = read_xml_header(path)
        except LidcXmlError as error:
            summary.count("annotation_files_skipped")
            summary.skip_input(str(error), strict)
            continue
        if header.kind == "xray":
            summary.count("xray_annotation_files_skipped")
        elif header.kind != "ct":
            summary.count("other_xml_files_ignored")
        elif not header.series_instance_uid:  # a CT annotation we cannot match: never drop it silently
            summary.count("annotation_files_skipped")
            summary.skip_input(
                f"{path}: LIDC annotation without a SeriesInstanceUid in its ResponseHeader, so its nodules "
                "cannot be matched to a CT series; add the series UID or remove the file",
                strict,
            )
        else:
            annotations[header.series_instance_uid].append(os.fspath(path))

    series: dict[str, tuple[str, Path]] = {}
    for directory in tqdm(sorted(dicom_dirs), desc="reading DICOM headers", disable=not progress, unit="folder"):
        dicom_header, read_error = _series_header(directory, sorted(dicom_dirs[directory]))
        if dicom_header is None:
            summary.skip_input(f"{directory}: no readable DICOM file ({read_error})", strict)
            continue
        if str(getattr(dicom_header, "Modality", "CT")).upper() != "CT":
            summary.count("non_ct_series_skipped")
            continue
        uid = str(getattr(dicom_header, "SeriesInstanceUID", ""))
        patient = str(getattr(dicom_header, "PatientID", "") or uid)
        if uid in series:
            summary.warn(f"{directory}: series {uid} also in {series[uid][1]}; using the first folder")
            continue
        series[uid] = (patient, directory)

    for uid in sorted(set(annotations) - set(series)):
        summary.warn(f"{annotations[uid][0]}: series {uid} not found under {source}")
    summary.count("ct_series_without_annotations", len(set(series) - set(annotations)))

    by_patient: dict[str, list[str]] = defaultdict(list)
    for uid in sorted(set(series) & set(annotations)):
        by_patient[series[uid][0]].append(uid)
    tasks = []
    for patient in sorted(by_patient):
        for number, uid in enumerate(sorted(by_patient[patient])):
            tasks.append(
                ScanTask(
                    series_uid=uid,
                    patient_id=patient,
                    dicom_dir=os.fspath(series[uid][1]),
                    xml_paths=tuple(sorted(annotations[uid])),
                    case_prefix=f"{patient}_s{number}",
                    options=options,
                )
            )
    return tasks


# -- the whole import ------------------------------------------------------------------------------
def prepare_lidc(
    source: str | os.PathLike,
    out: str | os.PathLike,
    options: LidcOptions = LidcOptions(),
    xml_dirs: tuple[str | os.PathLike, ...] = (),
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> common.ImportSummary:
    """Convert a TCIA LIDC-IDRI download into a dataset at ``out``; returns the summary.

    Raises:
        FileNotFoundError: no source folder or no DICOM file.
        DatasetExistsError: ``out`` exists and ``overwrite`` is False.
        ImportFailedError: a scan failed under ``strict``, or no sample was produced.
    """
    if options.crop_size < 2:
        raise ValueError(f"--crop-size must be at least 2, got {options.crop_size}")
    if options.window[1] <= options.window[0]:
        raise ValueError(f"--window must be LOW HIGH with LOW < HIGH, got {options.window}")
    if options.spacing is not None and options.spacing <= 0:
        raise ValueError(f"--spacing must be positive, got {options.spacing}")
    summary_options = {
        "crop_size": options.crop_size,
        "spacing_mm": options.spacing,
        "hu_window": list(options.window),
        "normalisation": "HU clipped to the window, scaled linearly to [0, 1]",
        "num_readers": options.num_readers,
        "group_tolerance_mm": options.group_tolerance,
        "min_readers": options.min_readers,
        "mask_outline": "included" if options.include_outline else "excluded (pixels strictly inside the outline)",
        "split_fractions": list(split_fractions),
        "seed": seed,
    }
    summary = common.ImportSummary("lidc", summary_options)
    # the destination is checked before the (long) walk over the source
    writer = common.open_dataset(
        out, "lidc", "CT", options.num_readers, 1, overwrite, "LIDC-IDRI (TCIA DICOM + XML)", summary_options
    )
    job = common.ImportJob(writer, summary, source, strict, progress, workers)
    tasks = discover_scans(source, options, tuple(xml_dirs), summary, strict, progress)
    if not tasks:
        raise common.InputError(f"{source}: no CT series with an LIDC annotation file (LidcReadMessage XML) found")
    split_of = split_patients([t.patient_id for t in tasks], split_fractions, seed)

    def record(result: Any) -> None:  # a ScanResult whose samples the worker wrote (WrittenSample)
        job.register(result.samples, split_of)
        summary.warnings.extend(result.warnings)
        summary.counts.update(result.counts)
        summary.count("scans_converted")

    return job.run(process_scan, tasks, lambda t: t.dicom_dir, record, desc="LIDC scans", write_in_worker=True)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ambiseg prepare lidc``."""
    parser.add_argument("--source", required=True, help="the TCIA LIDC-IDRI download (folders of DICOM series)")
    parser.add_argument(
        "--xml-dir",
        action="append",
        default=[],
        help="a folder with the XML annotation files, if they are not next to the DICOMs (repeatable)",
    )
    common.add_output_arguments(parser)
    parser.add_argument("--crop-size", type=int, default=128, help="side of the square crop in pixels (default 128)")
    parser.add_argument(
        "--spacing", type=float, default=None, help="resample to this isotropic in-plane pixel spacing in mm"
    )
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=[-1000.0, 400.0],
        metavar=("LOW", "HIGH"),
        help="HU window mapped to [0, 1] (default -1000 400)",
    )
    parser.add_argument("--num-readers", type=int, default=4, help="mask channels per sample (default 4)")
    parser.add_argument(
        "--group-tolerance",
        type=float,
        default=None,
        help="max distance in mm between readers' contours of one nodule (default: the slice spacing)",
    )
    parser.add_argument(
        "--min-readers", type=int, default=1, help="keep nodules outlined by at least this many readers (default 1)"
    )
    parser.add_argument(
        "--include-outline",
        action="store_true",
        help="count the readers' outline pixels as nodule (default: only the pixels strictly inside the outline, "
        "as pylidc; the readers drew the outline just outside the nodule)",
    )
    common.add_split_arguments(parser)
    common.add_worker_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run ``ambiseg prepare lidc``."""
    options = LidcOptions(
        crop_size=args.crop_size,
        spacing=args.spacing,
        window=(float(args.window[0]), float(args.window[1])),
        num_readers=args.num_readers,
        group_tolerance=args.group_tolerance,
        min_readers=args.min_readers,
        include_outline=args.include_outline,
    )
    return common.run_import(prepare_lidc, args, options=options, xml_dirs=tuple(args.xml_dir))
