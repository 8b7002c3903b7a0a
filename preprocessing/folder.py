"""Convert a folder of 2D images with one mask per rater, described by a CSV file, to the standard
multi-rater format (for private data such as the bone ultrasound set of CIMD).

Usage::

    ambiseg prepare folder --csv my_data/cases.csv --out data/my_data --modality US

The CSV (paths relative to its own folder)::

    image,mask_1,mask_2,mask_3,patient_id,split
    images/p01_a.png,masks/p01_a_r1.png,masks/p01_a_r2.png,masks/p01_a_r3.png,p01,training
    images/p02_a.png,masks/p02_a_r1.png,,masks/p02_a_r3.png,p02,

* ``image`` (required): a PNG/JPEG/TIFF file (grey -> 1 channel, RGB -> 3, alpha dropped) or a 2D
  NIfTI file (singleton axes squeezed; a short axis of size <= 8 becomes the channels);
* every column whose name starts with ``mask`` is one rater, in column order; an empty cell is
  a rater who did not mark anything (an empty mask); a row with more or fewer cells than the
  header is an error naming its line; masks must be binary (0/1, 0/255 or boolean; for an RGB
  mask any set channel counts), anything else is an error naming the file and the values found;
* ``case_id`` (optional, default: the image file name without extension), ``patient_id``
  (optional, default: the case id), ``split`` (optional: training/validation/test; rows without
  one are split by patient with a seeded 60/20/20 draw);
* intensities (``--normalisation``): ``auto`` divides 8/16-bit images by 255/65535 and min-max
  scales anything else to [0, 1]; ``minmax`` min-max scales every image; ``none`` keeps values;
* ``--size H W`` resizes everything (images linearly, masks by thresholding a linear interpolation).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from ambiseg_monai.data.datalist import SPLITS, DatasetWriter, split_patients
from ambiseg_monai.data.nifti import is_nifti_path

from . import common

__all__ = ["FolderRow", "read_csv", "read_image_file", "convert_row", "prepare_folder", "configure_parser", "main"]

SPLIT_NAMES = {
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
}
NORMALISATIONS = ("auto", "minmax", "none")


@dataclass(frozen=True)
class FolderRow:
    """One CSV row, resolved: absolute paths (None for an empty mask cell) and identity."""

    line: int
    csv_path: str
    case_id: str
    patient_id: str
    split: str | None
    image: str
    masks: tuple[str | None, ...]
    normalisation: str
    size: tuple[int, int] | None


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """A 2D image file as a C x H x W array in its stored dtype; :class:`common.InputError` names the file."""
    path = Path(path)
    if not path.is_file():
        raise common.InputError(f"{path}: file not found")
    try:
        if is_nifti_path(path):
            array = np.squeeze(np.asarray(nib.load(os.fspath(path)).dataobj))
            if array.ndim == 3 and min(array.shape) <= 8:
                array = np.moveaxis(array, int(np.argmin(array.shape)), 0)
            elif array.ndim == 2:
                array = array[None]
        else:
            with Image.open(path) as image:
                if image.mode in ("RGBA", "LA", "P", "PA"):
                    image = image.convert("RGB" if image.mode in ("RGBA", "P", "PA") else "L")
                array = np.asarray(image)
            array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    except common.InputError:
        raise
    except Exception as error:  # PIL and nibabel raise many types for corrupt files
        raise common.InputError(f"{path}: cannot read image ({error})") from error
    if array.ndim != 3:
        raise common.InputError(f"{path}: expected a 2D image, got shape {array.shape}")
    return array


def _normalise(image: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return image.astype(np.float32)
    if how == "auto" and image.dtype in (np.uint8, np.uint16):
        return (image.astype(np.float32) / np.iinfo(image.dtype).max).astype(np.float32)
    return np.stack([common.normalise_minmax(channel) for channel in image.astype(np.float32)])


def convert_row(row: FolderRow) -> common.Sample:
    """Read one row's image and masks; :class:`common.InputError` names the CSV line and the file."""
    where = f"{row.csv_path} line {row.line}"
    try:
        image = read_image_file(row.image)
        masks = []
        for path in row.masks:
            if path is None:
                masks.append(np.zeros(image.shape[1:], np.uint8))
                continue
            mask = read_image_file(path)
            if mask.shape[1:] != image.shape[1:]:
                raise common.InputError(
                    f"{path}: mask is {mask.shape[1:]}, image {Path(row.image).name} is {image.shape[1:]}"
                )
            masks.append(common.check_binary_mask(mask, os.fspath(path)).max(axis=0))  # an RGB mask: any channel set
        common.check_finite(image, row.image)
    except common.InputError as error:
        raise common.InputError(f"{where}: {error}") from None
    image, label = _normalise(image, row.normalisation), np.stack(masks)
    if row.size is not None:
        image, label = common.resize_image(image, row.size), common.resize_masks(label, row.size)
    return common.Sample(
        row.case_id,
        row.patient_id,
        image,
        label,
        {"source_image": os.path.relpath(row.image, Path(row.csv_path).parent)},
        split=row.split,
    )


def read_csv(
    csv_path: str | os.PathLike, normalisation: str = "auto", size: tuple[int, int] | None = None
) -> list[FolderRow]:
    """Parse and check the CSV (columns, split names, unique case ids) before any image is read."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: CSV file not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = []
        for raw in reader:
            # DictReader puts extra cells under the key None and fills missing ones with None: a row
            # that is too short would otherwise read as "this rater marked nothing"
            cells = len(columns) + len(raw.get(None) or []) - sum(value is None for value in raw.values())
            if cells != len(columns):
                raise common.InputError(
                    f"{csv_path} line {reader.line_num}: {cells} cells, but the header has {len(columns)} columns "
                    f"({', '.join(columns)}); fix the row (an empty mask cell still needs its comma)"
                )
            rows.append((reader.line_num, raw))
    if "image" not in columns:
        raise common.InputError(f"{csv_path}: no 'image' column (columns: {', '.join(columns) or 'none'})")
    mask_columns = [c for c in reader.fieldnames or [] if c.strip().lower().startswith("mask")]
    if not mask_columns:
        raise common.InputError(f"{csv_path}: no mask column (one column per rater, named mask_1, mask_2, ...)")
    if not rows:
        raise common.InputError(f"{csv_path}: no rows")
    base = csv_path.parent
    resolved: list[FolderRow] = []
    seen: dict[str, int] = {}
    for line, raw in rows:
        row = {key.strip(): (value or "").strip() for key, value in raw.items() if key is not None}
        if not row["image"]:
            raise common.InputError(f"{csv_path} line {line}: empty 'image' cell")
        case_id = re.sub(r"[^A-Za-z0-9_.-]", "_", row.get("case_id") or Path(row["image"]).name.split(".")[0])
        if case_id in seen:
            raise common.InputError(f"{csv_path} line {line}: case id '{case_id}' already used on line {seen[case_id]}")
        seen[case_id] = line
        split_name = row.get("split", "").lower()
        if split_name and split_name not in SPLIT_NAMES:
            raise common.InputError(f"{csv_path} line {line}: unknown split '{row['split']}' (use {', '.join(SPLITS)})")
        masks = tuple(os.fspath(base / raw[c].strip()) if (raw[c] or "").strip() else None for c in mask_columns)
        resolved.append(
            FolderRow(
                line,
                os.fspath(csv_path),
                case_id,
                row.get("patient_id") or case_id,
                SPLIT_NAMES.get(split_name),
                os.fspath(base / row["image"]),
                masks,
                normalisation,
                size,
            )
        )
    return resolved


def _first_readable_channels(rows: list[FolderRow]) -> int:
    """Channel count of the first image that can be read (it fixes the dataset's image_channels)."""
    first_error = None
    for row in rows:
        try:
            return read_image_file(row.image).shape[0]
        except common.InputError as error:
            first_error = first_error or error
    raise common.InputError(f"{rows[0].csv_path}: no image could be read ({first_error})")


def prepare_folder(
    csv_path: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    modality: str = "other",
    normalisation: str = "auto",
    size: tuple[int, int] | None = None,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> common.ImportSummary:
    """Convert the CSV-described folder into a dataset at ``out``; returns the summary."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"--normalisation must be one of {NORMALISATIONS}, got '{normalisation}'")
    rows = read_csv(csv_path, normalisation, common.image_size(size))
    num_raters = len(rows[0].masks)
    name = name or Path(csv_path).stem
    options = {
        "csv": os.fspath(csv_path),
        "normalisation": normalisation,
        "size": list(size) if size else None,
        "split_fractions": list(split_fractions),
        "seed": seed,
    }
    summary = common.ImportSummary(name, options)
    # rows with a split keep it; the other rows' patients are drawn (patients already placed keep their split)
    fixed = {row.patient_id: row.split for row in rows if row.split}
    for row in rows:
        if row.split and fixed[row.patient_id] != row.split:
            raise common.InputError(f"{row.csv_path} line {row.line}: patient '{row.patient_id}' is in two splits")
    drawn = (
        split_patients([r.patient_id for r in rows if r.patient_id not in fixed], split_fractions, seed)
        if any(r.patient_id not in fixed for r in rows)
        else {}
    )
    split_of = {**drawn, **fixed}
    DatasetWriter(out, name, modality, 1, 1, overwrite=overwrite).check_destination()  # before reading images
    channels = _first_readable_channels(rows)
    writer = common.open_dataset(out, name, modality, num_raters, channels, overwrite, "folder + CSV", options)
    job = common.ImportJob(writer, summary, csv_path, strict, progress)

    def record(sample: common.Sample) -> None:
        if sample.image.shape[0] != channels:
            message = (
                f"{csv_path}: {sample.metadata['source_image']} has {sample.image.shape[0]} channels, "
                f"the first readable image has {channels}"
            )
            if strict:
                raise common.InputError(message)
            summary.skipped.append({"source": sample.metadata["source_image"], "reason": message})
            return
        job.write([sample], split_of)

    return job.run(convert_row, rows, lambda r: f"{r.csv_path} line {r.line}", record, desc=name)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ambiseg prepare folder``."""
    parser.add_argument(
        "--csv", required=True, help="CSV with columns image, mask_1..mask_R [, case_id, patient_id, split]"
    )
    parser.add_argument("--name", default=None, help="dataset name (default: the CSV file name)")
    parser.add_argument("--modality", default="other", help="imaging modality recorded in the datalist (e.g. US)")
    parser.add_argument(
        "--normalisation", choices=NORMALISATIONS, default="auto", help="intensity scaling (default auto)"
    )
    common.add_size_argument(parser)
    common.add_split_arguments(parser)
    common.add_output_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run ``ambiseg prepare folder``."""
    return common.run_import(prepare_folder, args, csv_path=args.csv)
