"""Dataset checks and inference inputs the bundle configs call (so that configs stay pure wiring).

- :func:`prepare_dataset`: the training-start check of ``dataset_dir`` (generates the demo dataset at
  its default place); a missing dataset names the ``ambiseg prepare ...`` command (:func:`prepare_command`);
- :func:`padded_rater_count`: the rater count batches pad to;
- :func:`inference_items`: the items of an inference run (a folder of NIfTI images or a dataset).

Their user errors end a bundle run with a short message (:mod:`ambiseg_monai.bundle.errors`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ambiseg_monai.bundle.errors import (
    BundleInputError,
    DatasetNotPreparedError,
    InferenceInputError,
    short_errors_in_bundle_cli,
)
from ambiseg_monai.data.datalist import (
    DATALIST_FILENAME,
    load_datalist,
    load_split,
    max_num_raters,
    validate_datalist,
)
from ambiseg_monai.data.nifti import is_nifti_path

__all__ = ["prepare_command", "prepare_dataset", "padded_rater_count", "inference_items"]


def prepare_command(dataset_dir: str | os.PathLike) -> str:
    """The ``ambiseg prepare ...`` command that writes a dataset to ``dataset_dir``, guessed from the
    folder's name as the bundles' overlays and docs/datasets.md name them (``data/lidc``,
    ``data/ms_isbi2015``, ``data/qubiq_kidney``, ``data/bone_us``, ...); ``<...>`` marks what the user
    fills in."""
    out = str(dataset_dir)
    name = Path(dataset_dir).name.lower()
    if "demo" in name:
        return f"ambiseg prepare demo --out {out}"
    if name.startswith("lidc") and "pickle" in name:
        return f"ambiseg prepare lidc-pickle --source <data_lidc.pickle> --out {out}"
    if name.startswith("lidc"):
        return f"ambiseg prepare lidc --source <LIDC-IDRI download folder> --out {out}"
    if name.startswith("ms"):
        return f"ambiseg prepare ms-isbi2015 --source <ISBI 2015 folder> --out {out}"
    if name.startswith("qubiq"):
        rest = name.removeprefix("qubiq").strip("_-")
        task = rest.rstrip("0123456789")
        subtask = f" --subtask {rest[len(task) :]}" if rest[len(task) :] else ""
        task = task.strip("_-").replace("_", "-")
        from ambiseg_monai.preprocessing.qubiq import QUBIQ_TASKS  # error path only: keep start-up light

        task = task if task in QUBIQ_TASKS else "<task>"
        return f"ambiseg prepare qubiq --source <QUBIQ data folder> --task {task}{subtask} --out {out}"
    if name.startswith("bone_us"):
        return f"ambiseg prepare folder --csv <cases.csv> --out {out} --name bone_us --modality US"
    return f"ambiseg prepare <importer> ... --out {out}"


def _not_prepared_message(path: Path) -> str:
    command = prepare_command(path)
    if "<importer>" in command:
        from ambiseg_monai.cli import PREPARE_COMMANDS

        see = f"<importer>: one of {', '.join(PREPARE_COMMANDS)}; see 'ambiseg prepare --help'"
    else:
        see = "options and other importers: 'ambiseg prepare --help'"
    return (
        f"{path / DATALIST_FILENAME}: no datalist found; dataset_dir '{path}' is not a prepared dataset. "
        f"Prepare it with:\n    {command}\n"
        f"({see}, docs/datasets.md), or set --dataset_dir to a prepared dataset."
    )


@short_errors_in_bundle_cli
def prepare_dataset(
    dataset_dir: str | os.PathLike,
    image_channels: int,
    demo_dir: str | os.PathLike | None = "data/demo",
    required_splits: tuple[str, ...] = ("training",),
    check_files: bool = True,
    same_size: bool = True,
) -> str:
    """Check a dataset against the bundle's settings and return its path (the training-start check).

    When ``dataset_dir`` is the default demo location (``demo_dir``) and holds no dataset yet, the
    demo dataset is generated there first. Any other missing folder is an error (never filled with
    demo data behind the user's back).

    With ``check_files`` every file of every split is checked once: it exists, image and label
    sizes and channel / rater counts agree, labels hold only 0 and 1, images only finite values;
    with ``same_size`` all images of a split must also share one H x W (set it to False when the
    bundle resizes its inputs). Results are remembered per file (path, size, modification time) in
    the dataset's ``.validation_cache.json``, so later starts only re-read files that changed.

    In ``python -m monai.bundle run`` these errors end the run with a short message (the error's
    text, no traceback; :class:`~ambiseg_monai.bundle.errors.BundleExit`) unless ``AMBISEG_DEBUG=1`` is set.

    Raises:
        DatasetNotPreparedError: ``dataset_dir`` holds no ``datalist.json``; the message gives the
            ``ambiseg prepare ...`` command that writes it.
        ValueError: the dataset's ``image_channels`` differs from the network's
            (:class:`BundleInputError`), or the data fail
            the contract (wrong rater count in a label file, missing files, non-binary labels,
            NaN pixels, mixed sizes, ...; the message names the datalist, the case and the file).
    """
    path = Path(dataset_dir)
    if demo_dir is not None and path.resolve() == Path(demo_dir).resolve():
        from ambiseg_monai.data.demo import ensure_demo_dataset

        ensure_demo_dataset(path, warn_if_different=True)
    if not (path / DATALIST_FILENAME).is_file():
        raise DatasetNotPreparedError(_not_prepared_message(path))
    datalist = load_datalist(path)
    if int(datalist["image_channels"]) != int(image_channels):
        raise BundleInputError(
            f"{path / 'datalist.json'}: the dataset has image_channels={datalist['image_channels']} but the "
            f"bundle's network is configured for image_channels={image_channels}; set --image_channels "
            f"{datalist['image_channels']} (or use the dataset's overlay config)."
        )
    validate_datalist(
        path,
        datalist,
        required_splits=required_splits,
        check_files=check_files,
        check_contents=True,
        check_sizes=same_size,
        cache=True,
    )
    return str(path)


def padded_rater_count(dataset_dir: str | os.PathLike) -> int:
    """The largest rater count of any item: the size batches pad the rater axis to."""
    return max_num_raters(load_datalist(dataset_dir))


@short_errors_in_bundle_cli
def inference_items(source: str | os.PathLike, split: str = "test") -> list[dict]:
    """Items ``{"image", "image_path", "case_id"}`` to run inference on.

    Args:
        source: a folder of NIfTI images (``*.nii`` / ``*.nii.gz``; the case id is the file name
            without extension), a prepared dataset folder, or its ``datalist.json``.
        split: the datalist split to use when ``source`` is a dataset.

    Raises:
        InferenceInputError: ``source`` does not exist or is neither such a folder nor a dataset.
        BundleInputError: ``source`` holds no NIfTI image.

    In ``python -m monai.bundle run`` these errors end the run with a short message (see
    :func:`prepare_dataset`).
    """
    path = Path(source)
    if path.is_file() and path.name == DATALIST_FILENAME:
        path = path.parent
    if (path / DATALIST_FILENAME).is_file():
        items = [
            {"image": i["image"], "image_path": i["image"], "case_id": str(i["case_id"])}
            for i in load_split(path, split)
        ]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and is_nifti_path(f))
        items = [{"image": str(f), "image_path": str(f), "case_id": f.name.split(".nii")[0]} for f in files]
    else:
        reason = "it does not exist" if not path.exists() else "it is a file"
        raise InferenceInputError(
            f"inference input '{source}' (input_dir) is neither a folder of NIfTI images nor a dataset: "
            f"{reason}.\nSet --input_dir to a folder of *.nii / *.nii.gz images or to a prepared dataset "
            "(or its datalist.json)."
        )
    if not items:
        raise BundleInputError(
            f"inference input '{source}' (input_dir) holds no NIfTI image (*.nii, *.nii.gz); "
            "set --input_dir to a folder of NIfTI images or to a prepared dataset."
        )
    return items
