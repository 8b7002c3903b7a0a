"""Convert the longitudinal MS lesion challenge data (ISBI 2015) to 2D multi-rater samples.

Usage::

    ambiseg prepare ms-isbi2015 --source ISBI2015/ --out data/ms --test-subjects training05 \\
        --split-fractions 1 0 0                     # CIMD: 4 training subjects, 1 test subject

Layout read (the challenge's preprocessed, skull-stripped, co-registered volumes)::

    training/trainingNN/preprocessed/trainingNN_TT_{flair,mprage,pd,t2}_pp.nii
    training/trainingNN/masks/trainingNN_TT_mask{1,2}.nii

Choices:

* volumes are reoriented to RAS; axial slices are taken along the superior axis and shown in
  radiological convention (anterior at the top, the patient's right on the image's left);
* channels are FLAIR, MPRAGE, PD, T2; each volume is normalised on its own: brain voxels
  (non-zero) clipped to their 0.5th/99.5th percentiles and scaled to [0, 1], background 0;
* slices without brain are dropped; ``--lesion-slices-only`` keeps only slices where a rater
  marked a lesion, plus a seeded ``--empty-fraction`` of the other brain slices;
* slices are resized to ``--size`` (64 x 64 as in CIMD; images linearly, masks by thresholding a
  linear interpolation at 0.5); ``--keep-aspect`` zero-pads to a square first;
* the label holds the two raters' masks, which must be binary (0/1, 0/255 or boolean; anything
  else, and NaN anywhere, is an error naming the file); splits are by subject (``--test-subjects``,
  ``--validation-subjects``, the other subjects drawn with ``--split-fractions``/``--seed``).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ambiseg_monai.data.datalist import split_patients

from . import common

__all__ = [
    "SEQUENCES",
    "TimepointTask",
    "find_timepoints",
    "convert_timepoint",
    "prepare_ms_isbi2015",
    "configure_parser",
    "main",
]

SEQUENCES = ("flair", "mprage", "pd", "t2")
RATERS = (1, 2)
PERCENTILES = (0.5, 99.5)
TIMEPOINT = re.compile(r"^(training\d+)_(\d+)_flair_pp\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class TimepointTask:
    """One subject's time point: its six files and the slicing options."""

    subject: str
    timepoint: int
    images: tuple[str, ...]  # in SEQUENCES order
    masks: tuple[str, ...]  # in RATERS order
    size: tuple[int, int]
    keep_aspect: bool
    lesion_slices_only: bool
    empty_fraction: float
    seed: int


def _find(folder: Path, stem: str) -> str:
    for suffix in (".nii", ".nii.gz"):
        if (folder / f"{stem}{suffix}").is_file():
            return os.fspath(folder / f"{stem}{suffix}")
    raise common.InputError(f"{folder / (stem + '.nii')}: file not found")


def find_timepoints(source: str | os.PathLike, options: dict) -> list[TimepointTask | common.InputError]:
    """Every ``trainingNN_TT`` under ``<source>/training`` (or ``source`` itself), as a task or, when
    one of its six files is missing, as the error naming that file."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: ISBI 2015 folder not found")
    root = source / "training" if (source / "training").is_dir() else source
    found: list[TimepointTask | common.InputError] = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("training")):
        preprocessed, masks = subject_dir / "preprocessed", subject_dir / "masks"
        if not preprocessed.is_dir():
            continue
        for flair in sorted(preprocessed.iterdir()):
            match = TIMEPOINT.match(flair.name)
            if not match:
                continue
            subject, timepoint = match.group(1), int(match.group(2))
            prefix = f"{subject}_{match.group(2)}"
            try:
                images = tuple(_find(preprocessed, f"{prefix}_{s}_pp") for s in SEQUENCES)
                rater_masks = tuple(_find(masks, f"{prefix}_mask{r}") for r in RATERS)
            except common.InputError as error:
                found.append(error)
                continue
            found.append(TimepointTask(subject, timepoint, images, rater_masks, **options))
    if not found:
        raise FileNotFoundError(f"{root}: no trainingNN/preprocessed/trainingNN_TT_flair_pp.nii found")
    return found


def _load_ras(path: str, reference: tuple | None, what: str = "volume") -> tuple[np.ndarray, tuple]:
    """An X x Y x Z volume in RAS orientation (stored dtype for a mask, float32 for an image volume)."""
    try:
        image = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(image.dataobj) if what == "mask" else np.asarray(image.dataobj, dtype=np.float32)
    except FileNotFoundError as error:
        raise common.InputError(f"{path}: file not found") from error
    except Exception as error:
        raise common.InputError(f"{path}: cannot read NIfTI file ({error})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise common.InputError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if reference is not None and data.shape != reference:
        raise common.InputError(f"{path}: volume is {data.shape}, the time point's FLAIR is {reference}")
    if what != "mask":
        common.check_finite(data, path, what)
    return data, data.shape


def _radiological(axial: np.ndarray) -> np.ndarray:
    """RAS (x, y) slice(s) ``(..., X, Y)`` -> display rows (anterior on top) x columns (patient right on left)."""
    return np.flip(np.swapaxes(axial, -1, -2), axis=(-2, -1))


def _pad_square(array: np.ndarray) -> np.ndarray:
    height, width = array.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    pad = [(0, 0)] * (array.ndim - 2) + [(top, side - height - top), (left, side - width - left)]
    return np.pad(array, pad)


def convert_timepoint(task: TimepointTask) -> list[common.Sample]:
    """Load one time point's four sequences and two masks and cut it into axial samples."""
    flair, shape = _load_ras(task.images[0], None)
    volumes = [flair] + [_load_ras(path, shape)[0] for path in task.images[1:]]
    masks = np.stack([common.check_binary_mask(_load_ras(path, shape, "mask")[0], path) for path in task.masks])
    brain = np.any(np.stack(volumes) != 0, axis=0)
    channels = np.stack(
        [np.where(brain, common.normalise_minmax(volume, *PERCENTILES, mask=brain), 0.0) for volume in volumes]
    ).astype(np.float32)

    has_brain = brain.any(axis=(0, 1))
    has_lesion = np.asarray(masks.any(axis=(0, 1, 2)))
    keep = has_brain.copy()
    if task.lesion_slices_only:
        others = np.flatnonzero(has_brain & ~has_lesion)
        rng = np.random.default_rng([task.seed, int(task.subject.lower().replace("training", "") or 0), task.timepoint])
        chosen = rng.choice(others, size=int(round(task.empty_fraction * len(others))), replace=False)
        keep = has_lesion & has_brain
        keep[chosen] = True

    samples = []
    for k in np.flatnonzero(keep):
        image = _radiological(channels[:, :, :, k])
        label = _radiological(masks[:, :, :, k])
        if task.keep_aspect:
            image, label = _pad_square(image), _pad_square(label)
        samples.append(
            common.Sample(
                case_id=f"{task.subject}_{task.timepoint:02d}_z{k:03d}",
                patient_id=task.subject,
                image=common.resize_image(image, task.size),
                label=common.resize_masks(label, task.size),
                metadata={"timepoint": task.timepoint, "slice_index": int(k), "lesion": bool(has_lesion[k])},
            )
        )
    return samples


def prepare_ms_isbi2015(
    source: str | os.PathLike,
    out: str | os.PathLike,
    size: tuple[int, int] = (64, 64),
    keep_aspect: bool = False,
    lesion_slices_only: bool = False,
    empty_fraction: float = 0.0,
    test_subjects: tuple[str, ...] = (),
    validation_subjects: tuple[str, ...] = (),
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> common.ImportSummary:
    """Convert the ISBI 2015 training data into a dataset at ``out``; returns the summary."""
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"--empty-fraction must be in [0, 1], got {empty_fraction}")
    options = {
        "size": list(size),
        "keep_aspect": keep_aspect,
        "lesion_slices_only": lesion_slices_only,
        "empty_fraction": empty_fraction,
        "channels": list(SEQUENCES),
        "normalisation": f"per volume: brain voxels clipped to percentiles {PERCENTILES}, scaled to [0, 1]",
        "test_subjects": list(test_subjects),
        "validation_subjects": list(validation_subjects),
        "split_fractions": list(split_fractions),
        "seed": seed,
    }
    summary = common.ImportSummary("ms-isbi2015", options)
    writer = common.open_dataset(
        out,
        "ms_isbi2015",
        "MR",
        len(RATERS),
        len(SEQUENCES),
        overwrite,
        "ISBI 2015 longitudinal MS lesion segmentation",
        options,
    )
    found = find_timepoints(
        source,
        {
            "size": tuple(size),
            "keep_aspect": keep_aspect,
            "lesion_slices_only": lesion_slices_only,
            "empty_fraction": empty_fraction,
            "seed": seed,
        },
    )
    tasks = [t for t in found if isinstance(t, TimepointTask)]
    for error in (e for e in found if isinstance(e, common.InputError)):
        summary.skip_input(str(error), strict)
    subjects = sorted({t.subject for t in tasks})
    unknown = sorted((set(test_subjects) | set(validation_subjects)) - set(subjects))
    if unknown:
        raise ValueError(f"{source}: subjects {unknown} not found (subjects: {', '.join(subjects)})")
    fixed = {**dict.fromkeys(validation_subjects, "validation"), **dict.fromkeys(test_subjects, "test")}
    rest = [s for s in subjects if s not in fixed]
    split_of = {**(split_patients(rest, split_fractions, seed) if rest else {}), **fixed}

    def record(samples: list[common.WrittenSample]) -> None:
        job.register(samples, split_of)
        summary.count("timepoints_converted")

    job = common.ImportJob(writer, summary, source, strict, progress, workers)
    return job.run(
        convert_timepoint, tasks, lambda t: t.images[0], record, desc="ISBI 2015 time points", write_in_worker=True
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ambiseg prepare ms-isbi2015``."""
    parser.add_argument("--source", required=True, help="the ISBI 2015 folder (holding training/trainingNN/...)")
    common.add_size_argument(parser, (64, 64), "slice size (default 64 64)")
    parser.add_argument("--keep-aspect", action="store_true", help="zero-pad slices to a square before resizing")
    parser.add_argument("--lesion-slices-only", action="store_true", help="keep only slices with a rater's lesion")
    parser.add_argument(
        "--empty-fraction",
        type=float,
        default=0.0,
        help="with --lesion-slices-only: fraction of the lesion-free brain slices kept as well (default 0)",
    )
    parser.add_argument("--test-subjects", nargs="*", default=[], help="subjects for the test split (e.g. training05)")
    parser.add_argument("--validation-subjects", nargs="*", default=[], help="subjects for the validation split")
    common.add_split_arguments(parser)
    common.add_worker_arguments(parser)
    common.add_output_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run ``ambiseg prepare ms-isbi2015``."""
    return common.run_import(prepare_ms_isbi2015, args)
