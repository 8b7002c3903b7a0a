"""The data contract: ``datalist.json`` and the files it names.

A prepared dataset is a folder::

    <dataset_dir>/datalist.json
    <dataset_dir>/images/<case_id>.nii.gz   C x H x W float32, stored as (H, W, 1, C)
    <dataset_dir>/labels/<case_id>.nii.gz   R x H x W uint8 {0, 1}, one channel per rater

``datalist.json`` holds the dataset's name, modality, ``num_raters`` (the usual rater count),
``image_channels`` and three splits (``training``, ``validation``, ``test``), each a list of
items ``{"image", "label", "case_id", "patient_id", ...}`` with paths relative to the folder.
An item whose rater count differs from ``num_raters`` records its own ``num_raters``. Any other
per-item keys (metadata, the demo dataset's ``truth``) are carried along untouched.

Every importer writes through :class:`DatasetWriter` (atomic: a temporary folder renamed into
place) and every bundle reads through :func:`load_datalist` / :func:`load_split`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ambiseg_monai.data.nifti import load_channel_first_nifti, nifti_channel_first_shape, save_channel_first_nifti

__all__ = [
    "DATALIST_FILENAME",
    "SPLITS",
    "DatalistError",
    "DatasetExistsError",
    "DatasetWriter",
    "load_datalist",
    "load_split",
    "split_patients",
    "item_num_raters",
    "max_num_raters",
    "validate_datalist",
    "write_json_atomic",
]

DATALIST_FILENAME = "datalist.json"
SPLITS = ("training", "validation", "test")
REQUIRED_TOP_KEYS = ("name", "modality", "num_raters", "image_channels")
REQUIRED_ITEM_KEYS = ("image", "label", "case_id", "patient_id")


class DatalistError(ValueError):
    """A dataset does not satisfy the data contract; the message names the file and the item."""


class DatasetExistsError(FileExistsError):
    """The output folder already holds a dataset and overwriting was not requested."""


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_datalist(dataset_dir: str | os.PathLike) -> dict:
    """Read ``<dataset_dir>/datalist.json`` (structure checked, files not opened)."""
    path = Path(dataset_dir) / DATALIST_FILENAME
    if not path.is_file():
        raise DatalistError(f"{path}: no datalist found (is '{dataset_dir}' a prepared dataset?)")
    try:
        with open(path, encoding="utf-8") as handle:
            datalist = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatalistError(f"{path}: not valid JSON ({error})") from error
    _check_structure(datalist, path)
    return datalist


def item_num_raters(datalist: dict, item: dict) -> int:
    """The number of raters of ``item`` (its own ``num_raters`` or the dataset's)."""
    return int(item.get("num_raters", datalist["num_raters"]))


def max_num_raters(datalist: dict) -> int:
    """The largest rater count of any item: the padded size of a batch's rater axis."""
    counts = [item_num_raters(datalist, item) for split in SPLITS for item in datalist.get(split, [])]
    return max(counts, default=int(datalist["num_raters"]))


def load_split(dataset_dir: str | os.PathLike, split: str, required: bool = True) -> list[dict]:
    """Items of one split with ``image``/``label`` (and ``truth`` masks) as absolute paths.

    Every item also gets ``num_raters``, so transforms can handle variable rater counts.
    Raises :class:`DatalistError` when ``required`` and the split is missing or empty.
    """
    dataset_dir = Path(dataset_dir).resolve()
    datalist = load_datalist(dataset_dir)
    items = datalist.get(split, [])
    if required and not items:
        raise DatalistError(f"{dataset_dir / DATALIST_FILENAME}: split '{split}' is empty or missing")
    resolved = []
    for item in items:
        item = dict(item)
        item["image"] = str(dataset_dir / item["image"])
        item["label"] = str(dataset_dir / item["label"])
        item["num_raters"] = item_num_raters(datalist, item)
        if isinstance(item.get("truth"), dict) and "masks" in item["truth"]:
            item["truth"] = {**item["truth"], "masks": str(dataset_dir / item["truth"]["masks"])}
        resolved.append(item)
    return resolved


def _check_structure(datalist: Any, path: Path) -> None:
    if not isinstance(datalist, dict):
        raise DatalistError(f"{path}: top level must be a JSON object")
    for key in REQUIRED_TOP_KEYS:
        if key not in datalist:
            raise DatalistError(f"{path}: missing top-level key '{key}'")
    for key in ("num_raters", "image_channels"):
        if not isinstance(datalist[key], int) or datalist[key] < 1:
            raise DatalistError(f"{path}: '{key}' must be a positive integer, got {datalist[key]!r}")
    for split in SPLITS:
        items = datalist.get(split, [])
        if not isinstance(items, list):
            raise DatalistError(f"{path}: split '{split}' must be a list")
        for index, item in enumerate(items):
            missing = [key for key in REQUIRED_ITEM_KEYS if key not in item] if isinstance(item, dict) else ["all"]
            if missing:
                raise DatalistError(f"{path}: item {index} of '{split}' lacks keys {missing}")


def validate_datalist(
    dataset_dir: str | os.PathLike,
    datalist: dict | None = None,
    required_splits: Sequence[str] = (),
    check_files: bool = True,
    check_contents: bool = True,
) -> dict:
    """Check a dataset against the contract and return a summary.

    Args:
        dataset_dir: the dataset folder (paths in the datalist are relative to it).
        datalist: the parsed datalist; read from ``dataset_dir`` when omitted.
        required_splits: splits that must exist and be non-empty (e.g. what a bundle trains on).
        check_files: check that the files exist and that image and label shapes agree.
        check_contents: also read the labels and check they are binary.

    Returns:
        ``{"num_items": {split: n}, "num_patients": {split: n}, "raters": {count: n}}``.

    Raises:
        DatalistError: naming the datalist, the split, the case and the file at fault.
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / DATALIST_FILENAME
    if datalist is None:
        datalist = load_datalist(dataset_dir)
    else:
        _check_structure(datalist, path)

    for split in required_splits:
        if not datalist.get(split):
            raise DatalistError(f"{path}: split '{split}' is empty or missing, but it is required")

    seen_cases: dict[str, str] = {}
    patient_split: dict[str, str] = {}
    rater_counts: dict[int, int] = {}
    for split in SPLITS:
        for item in datalist.get(split, []):
            case = str(item["case_id"])
            where = f"{path}: case '{case}' in '{split}'"
            if case in seen_cases:
                raise DatalistError(f"{where}: duplicate case id (also in '{seen_cases[case]}')")
            seen_cases[case] = split
            patient = str(item["patient_id"])
            if patient_split.setdefault(patient, split) != split:
                raise DatalistError(
                    f"{where}: patient '{patient}' appears in both '{patient_split[patient]}' and '{split}'"
                )
            expected_raters = item_num_raters(datalist, item)
            rater_counts[expected_raters] = rater_counts.get(expected_raters, 0) + 1
            if check_files:
                _check_item_files(dataset_dir, datalist, item, where, expected_raters, check_contents)

    return {
        "num_items": {split: len(datalist.get(split, [])) for split in SPLITS},
        "num_patients": {
            split: len({str(item["patient_id"]) for item in datalist.get(split, [])}) for split in SPLITS
        },
        "raters": dict(sorted(rater_counts.items())),
    }


def _check_item_files(
    dataset_dir: Path, datalist: dict, item: dict, where: str, expected_raters: int, check_contents: bool
) -> None:
    image_file, label_file = dataset_dir / item["image"], dataset_dir / item["label"]
    for kind, file in (("image", image_file), ("label", label_file)):
        if not file.is_file():
            raise DatalistError(f"{where}: {kind} file {file} does not exist")
    try:
        image_shape = nifti_channel_first_shape(image_file)
        label_shape = nifti_channel_first_shape(label_file)
    except ValueError as error:
        raise DatalistError(f"{where}: {error}") from error
    if image_shape[0] != datalist["image_channels"]:
        raise DatalistError(
            f"{where}: image {image_file} has {image_shape[0]} channels, "
            f"the datalist declares image_channels={datalist['image_channels']}"
        )
    if image_shape[1:] != label_shape[1:]:
        raise DatalistError(
            f"{where}: image {image_file} is {image_shape[1]} x {image_shape[2]} but "
            f"label {label_file} is {label_shape[1]} x {label_shape[2]}"
        )
    if label_shape[0] != expected_raters:
        raise DatalistError(
            f"{where}: label {label_file} holds {label_shape[0]} rater masks, expected {expected_raters} "
            "(set the item's 'num_raters' if this case really has a different number of raters)"
        )
    if check_contents:
        labels, _ = load_channel_first_nifti(label_file)
        values = np.unique(labels)
        if not np.isin(values, (0, 1)).all():
            shown = ", ".join(f"{v:g}" for v in values[:6])
            raise DatalistError(f"{where}: label {label_file} is not binary (values {shown})")


class DatasetWriter:
    """Write a dataset atomically: everything goes to a temporary folder next to ``out_dir``,
    which is validated and renamed into place only when the ``with`` block succeeds.

    An exception inside the block (or in validation) removes the temporary folder, so an
    interrupted import never leaves a half-written dataset that looks complete. An existing
    dataset is replaced only with ``overwrite=True``, and only after the new one is complete.

    Example::

        with DatasetWriter("data/demo", name="demo", modality="synthetic", num_raters=4,
                           image_channels=1) as writer:
            writer.add_item("training", "case_000", "patient_000", image, raters)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        name: str,
        modality: str,
        num_raters: int,
        image_channels: int,
        overwrite: bool = False,
        required_splits: Sequence[str] = ("training",),
        metadata: dict | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.required_splits = tuple(required_splits)
        self.datalist: dict[str, Any] = {
            "name": name,
            "modality": modality,
            "num_raters": int(num_raters),
            "image_channels": int(image_channels),
            **(metadata or {}),
            **{split: [] for split in SPLITS},
        }
        self._tmp_dir: Path | None = None
        self.summary: dict | None = None

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> DatasetWriter:
        self.check_destination()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self._tmp_dir is not None and self._tmp_dir.exists():
                shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def check_destination(self) -> None:
        """Refuse (before any work) to replace an existing folder unless ``overwrite``."""
        if self.out_dir.exists() and not self.overwrite:
            if self.out_dir.is_file() or any(self.out_dir.iterdir()):
                what = "a dataset" if (self.out_dir / DATALIST_FILENAME).exists() else "files"
                raise DatasetExistsError(
                    f"{self.out_dir}: already holds {what}; choose another folder or pass overwrite=True "
                    "(--overwrite on the command line)"
                )

    # -- writing --------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The temporary folder being written (valid inside the ``with`` block)."""
        if self._tmp_dir is None:
            raise RuntimeError("DatasetWriter must be used as a context manager")
        return self._tmp_dir

    def add_item(
        self,
        split: str,
        case_id: str,
        patient_id: str,
        image: np.ndarray,
        label: np.ndarray,
        affine: np.ndarray | None = None,
        **extra: Any,
    ) -> dict:
        """Write one sample and record it in the datalist.

        Args:
            split: ``training``, ``validation`` or ``test``.
            case_id: unique id, also the file stem (``images/<case_id>.nii.gz``).
            patient_id: the patient (splits are by patient).
            image: C x H x W float image, normalised as the importer documents.
            label: R x H x W binary rater masks (an empty mask is a valid opinion).
            affine: optional 4 x 4 voxel-to-world matrix written into both files.
            extra: per-item metadata stored in the datalist (JSON-serialisable).

        Returns:
            The datalist item (paths relative to the dataset folder).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}', expected one of {SPLITS}")
        image = np.asarray(image, dtype=np.float32)
        label = np.asarray(label)
        where = f"case '{case_id}' ({split})"
        if image.ndim != 3 or label.ndim != 3:
            raise DatalistError(
                f"{where}: image must be C x H x W and label R x H x W, got {image.shape} and {label.shape}"
            )
        if image.shape[1:] != label.shape[1:]:
            raise DatalistError(f"{where}: image {image.shape[1:]} and label {label.shape[1:]} sizes differ")
        if image.shape[0] != self.datalist["image_channels"]:
            raise DatalistError(
                f"{where}: image has {image.shape[0]} channels, dataset has {self.datalist['image_channels']}"
            )
        if not np.isfinite(image).all():
            raise DatalistError(f"{where}: image contains NaN or infinite values")
        if not np.isin(np.unique(label), (0, 1)).all():
            raise DatalistError(f"{where}: label is not binary")
        item: dict[str, Any] = {
            "image": f"images/{case_id}.nii.gz",
            "label": f"labels/{case_id}.nii.gz",
            "case_id": str(case_id),
            "patient_id": str(patient_id),
        }
        if label.shape[0] != self.datalist["num_raters"]:
            item["num_raters"] = int(label.shape[0])
        item.update(extra)
        self.write_array(item["image"], image, affine)
        self.write_array(item["label"], label.astype(np.uint8), affine)
        self.datalist[split].append(item)
        return item

    def register_item(self, split: str, item: dict) -> dict:
        """Record an item whose files were already written under :attr:`root` (e.g. by a worker
        process, so compression runs in parallel). The commit validates its files like any other."""
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}', expected one of {SPLITS}")
        missing = [key for key in REQUIRED_ITEM_KEYS if key not in item]
        if missing:
            raise DatalistError(f"item {item.get('case_id', '?')!r} lacks keys {missing}")
        for key in ("image", "label"):
            if not (self.root / item[key]).is_file():
                raise DatalistError(f"case '{item['case_id']}' ({split}): {key} file {self.root / item[key]} was not written")
        self.datalist[split].append(dict(item))
        return item

    def write_array(self, relative_path: str, array: np.ndarray, affine: np.ndarray | None = None) -> str:
        """Write an extra C x H x W array (e.g. ground-truth masks) inside the dataset."""
        destination = self.root / relative_path
        destination.parent.mkdir(parents=True, exist_ok=True)
        save_channel_first_nifti(destination, array, affine)
        return relative_path

    def write_text(self, relative_path: str, text: str) -> str:
        """Write an extra text file (e.g. an import summary) inside the dataset."""
        destination = self.root / relative_path
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(text, encoding="utf-8")
        return relative_path

    def _commit(self) -> None:
        write_json_atomic(self.root / DATALIST_FILENAME, self.datalist)
        self.summary = validate_datalist(self.root, self.datalist, required_splits=self.required_splits)
        self.check_destination()  # the folder may have appeared while we were writing
        old = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out_dir, old)
        try:
            os.replace(self.root, self.out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, self.out_dir)
            raise
        self._tmp_dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def split_patients(
    patient_ids: Iterable[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, str]:
    """Assign each patient to a split by a seeded shuffle (``fractions`` for training/validation/test).

    Returns ``{patient_id: split}``. Every split with a non-zero fraction gets at least one patient
    when there are enough patients.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    patients = sorted(set(map(str, patient_ids)))
    order = np.random.default_rng(seed).permutation(len(patients))
    counts = np.floor(np.asarray(fractions) * len(patients)).astype(int)
    for index in np.argsort(-np.asarray(fractions)):  # hand out the remainder, largest fraction first
        if counts.sum() >= len(patients):
            break
        counts[index] += 1
    for index in range(3):  # a non-empty split for every requested fraction, when possible
        if fractions[index] > 0 and counts[index] == 0 and len(patients) >= 3:
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[index] += 1
    assignment: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        for position in order[start : start + count]:
            assignment[patients[position]] = split
        start += count
    return assignment
