"""Convert a QUBIQ challenge task (2020/2021, 2D tasks) to the standard multi-rater format.

Usage::

    ambiseg prepare qubiq --source training_data_v3/ --task prostate --subtask 2 --out data/qubiq_prostate2

Layout read: ``<source>/<task>/{Training,Validation}/caseNN/image.nii.gz`` with one
``taskKK_segRR.nii.gz`` per sub-task KK and rater RR (``--source`` may also be the task folder).

Choices:

* singleton axes are squeezed; a 3-axis image is a 2D image with channels on its smallest axis
  (brain-tumor: 4 MR sequences); the arrays keep the source's row/column order and affine;
* intensities: per image and channel, clipped to the 0.5th/99.5th percentiles and scaled to [0, 1];
* masks: every rater's file of the chosen sub-task, in file order (seg01, seg02, ...); each must be
  binary - 0/1, 0/255 or boolean - anything else (soft values, a stray 255 in a 0/1 mask, NaN) is
  an error naming the file and the values found; NaN in an image is an error too;
* the rater count of each case is recorded; a case with an unusual count (one prostate case has
  5 instead of 6) is kept and reported, or skipped with ``--require-raters``;
* ``Training`` becomes the ``training`` split and ``Validation`` the ``validation`` split, as
  given by the challenge; each case is its own patient; no test split;
* ``--size H W`` optionally resizes every case (images linearly, masks by thresholding a linear
  interpolation); by default the native size is kept (it varies between cases in some tasks).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from . import common

__all__ = [
    "QUBIQ_TASKS",
    "QubiqTask",
    "CaseTask",
    "find_cases",
    "convert_case",
    "prepare_qubiq",
    "configure_parser",
    "main",
]


@dataclass(frozen=True)
class QubiqTask:
    """What the challenge says about a task: sub-tasks, usual raters, image channels, modality."""

    subtasks: int
    raters: int
    channels: int
    modality: str


QUBIQ_TASKS = {
    "brain-growth": QubiqTask(subtasks=1, raters=7, channels=1, modality="MR"),
    "brain-tumor": QubiqTask(subtasks=3, raters=3, channels=4, modality="MR"),
    "kidney": QubiqTask(subtasks=1, raters=3, channels=1, modality="CT"),
    "prostate": QubiqTask(subtasks=2, raters=6, channels=1, modality="MR"),
}
SPLIT_FOLDERS = {"training": "training", "validation": "validation"}  # folder name (lower case) -> split
SEGMENTATION = re.compile(r"^task(\d+)_seg(\d+)\.nii(\.gz)?$", re.IGNORECASE)
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class CaseTask:
    """One case folder to convert."""

    folder: str
    split: str
    task: str
    subtask: int
    require_raters: bool
    size: tuple[int, int] | None


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(os.fspath(path))
        return np.asarray(image.dataobj), image.affine
    except FileNotFoundError:
        raise
    except Exception as error:  # nibabel raises several types for corrupt files
        raise common.InputError(f"{path}: cannot read NIfTI file ({error})") from error


def _image_channels_first(array: np.ndarray, path: Path) -> np.ndarray:
    """C x H x W from a 2D image (H x W, with singleton axes) or a multi-channel 2D image."""
    array = np.squeeze(array)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        channel_axis = int(np.argmin(array.shape))
        if array.shape[channel_axis] <= 8:
            return np.moveaxis(array, channel_axis, 0)
    raise common.InputError(f"{path}: expected a 2D image (optionally with channels), got shape {array.shape}")


def convert_case(task: CaseTask) -> common.Sample:
    """Read one case folder and return its sample.

    Raises:
        InputError: unreadable files, no mask of the sub-task, a mask whose size differs from the
            image, or (with ``require_raters``) an unusual rater count; the message names the file.
    """
    folder = Path(task.folder)
    image_path = next((folder / name for name in ("image.nii.gz", "image.nii") if (folder / name).is_file()), None)
    if image_path is None:
        raise common.InputError(f"{folder}: no image.nii.gz")
    affine: np.ndarray | None
    raw, affine = _load(image_path)
    image = _image_channels_first(raw, image_path).astype(np.float32)
    if tuple(raw.shape[:2]) != image.shape[1:]:
        affine = None  # the source's first two axes are not the image's rows and columns
    expected = QUBIQ_TASKS[task.task]
    if image.shape[0] != expected.channels:
        raise common.InputError(f"{image_path}: {image.shape[0]} channels, task {task.task} has {expected.channels}")

    segmentations = sorted(
        (int(match.group(2)), path)
        for path in folder.iterdir()
        if (match := SEGMENTATION.match(path.name)) and int(match.group(1)) == task.subtask
    )
    if not segmentations:
        raise common.InputError(f"{folder}: no mask of sub-task {task.subtask} (task{task.subtask:02d}_segRR.nii.gz)")
    if task.require_raters and len(segmentations) != expected.raters:
        raise common.InputError(
            f"{folder}: {len(segmentations)} rater masks for sub-task {task.subtask}, "
            f"task {task.task} has {expected.raters} (--require-raters)"
        )
    masks = []
    for _, path in segmentations:
        mask = np.squeeze(_load(path)[0])
        if mask.shape != image.shape[1:]:
            raise common.InputError(f"{path}: mask is {mask.shape}, the image {image_path.name} is {image.shape[1:]}")
        masks.append(common.check_binary_mask(mask, os.fspath(path)))
    label = np.stack(masks)

    common.check_finite(image, os.fspath(image_path))
    image = np.stack([common.normalise_minmax(channel, *PERCENTILES) for channel in image])
    if task.size is not None:
        image, label = common.resize_image(image, task.size), common.resize_masks(label, task.size)
        affine = None  # the source affine no longer fits the resized grid
    case = folder.name
    return common.Sample(
        case_id=f"{task.task}_t{task.subtask}_{task.split}_{case}",
        patient_id=f"{task.task}_{task.split}_{case}",
        image=image,
        label=label,
        affine=affine,
        split=task.split,
        metadata={"source_case": f"{folder.parent.name}/{case}", "raters": [rater for rater, _ in segmentations]},
    )


def find_cases(source: str | os.PathLike, task: str) -> list[tuple[str, Path]]:
    """``(split, case folder)`` of a task, from ``<source>/<task>/<Split>/`` or ``<source>/<Split>/``."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: QUBIQ folder not found")
    task_dir = source / task if (source / task).is_dir() else source
    cases: list[tuple[str, Path]] = []
    for split_dir in sorted(task_dir.iterdir()):
        split = SPLIT_FOLDERS.get(split_dir.name.lower())
        if split is None or not split_dir.is_dir():
            continue
        cases.extend((split, case) for case in sorted(split_dir.iterdir()) if case.is_dir())
    if not cases:
        raise FileNotFoundError(
            f"{task_dir}: no case folders found (expected {task_dir}/Training/caseNN/image.nii.gz ...)"
        )
    return cases


def prepare_qubiq(
    source: str | os.PathLike,
    out: str | os.PathLike,
    task: str,
    subtask: int = 1,
    require_raters: bool = False,
    size: tuple[int, int] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> common.ImportSummary:
    """Convert one QUBIQ task/sub-task into a dataset at ``out``; returns the summary."""
    if task not in QUBIQ_TASKS:
        raise ValueError(f"unknown QUBIQ task '{task}' (2D tasks: {', '.join(QUBIQ_TASKS)})")
    spec = QUBIQ_TASKS[task]
    if not 1 <= subtask <= spec.subtasks:
        raise ValueError(f"task {task} has sub-tasks 1..{spec.subtasks}, got {subtask}")
    options = {
        "task": task,
        "subtask": subtask,
        "size": list(size) if size else None,
        "normalisation": f"per image and channel: clip to percentiles {PERCENTILES}, scale to [0, 1]",
        "require_raters": require_raters,
    }
    summary = common.ImportSummary(f"qubiq-{task}", options)
    name = f"qubiq_{task.replace('-', '_')}_task{subtask}"
    writer = common.open_dataset(out, name, spec.modality, spec.raters, spec.channels, overwrite, "QUBIQ", options)
    job = common.ImportJob(writer, summary, source, strict, progress)
    tasks = [
        CaseTask(os.fspath(folder), split, task, subtask, require_raters, common.image_size(size))
        for split, folder in find_cases(source, task)
    ]

    def record(sample: common.Sample) -> None:
        if sample.label.shape[0] != spec.raters:
            summary.warn(
                f"{sample.metadata['source_case']}: {sample.label.shape[0]} raters instead of {spec.raters} "
                "(recorded as the item's num_raters)"
            )
        job.write([sample])

    return job.run(convert_case, tasks, lambda t: t.folder, record, desc=f"QUBIQ {task}")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ambiseg prepare qubiq``."""
    parser.add_argument("--source", required=True, help="QUBIQ data folder (holding the task folders) or a task folder")
    parser.add_argument("--task", required=True, choices=sorted(QUBIQ_TASKS), help="the 2D QUBIQ task")
    parser.add_argument("--subtask", type=int, default=1, help="sub-task number KK of taskKK_segRR (default 1)")
    parser.add_argument(
        "--require-raters", action="store_true", help="treat a case with an unusual rater count as broken"
    )
    common.add_size_argument(parser)
    common.add_output_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run ``ambiseg prepare qubiq``."""
    return common.run_import(prepare_qubiq, args)
