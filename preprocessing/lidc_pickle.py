"""Convert the community LIDC pickle (``data_lidc.pickle``, 15096 crops of 128 x 128) to the
standard multi-rater format.

Usage::

    ambiseg prepare lidc-pickle --source data_lidc.pickle --out data/lidc_pickle            # AmbDiffSeg split
    ambiseg prepare lidc-pickle --source data_lidc.pickle --out data/lidc_seeded --split seeded --seed 0

The file maps ``<patient>_<slice...>`` keys to ``{"image": H x W float in [0, 1], "masks": 4 x
H x W, "series_uid": str}``. Images are written unchanged (1 x H x W float32; NaN or infinite
values are an error), masks as R x H x W uint8 {0, 1}: each mask must be binary (0/1, 0/255 or
boolean); anything else is an error naming the key, the mask and the values found. The patient is
the key's part before the first underscore.

Splits: ``ambdiffseg`` (default) puts the patients of the package's ``data/lidc_split/test_ids.txt``
and ``vali_ids.txt`` (the AmbDiffSeg patient-level split) into test and validation and the rest
into training; ``seeded`` draws a seeded 60/20/20 patient split.

The pickle is read with a restricted unpickler: besides the pickle format's own values (dicts,
lists, tuples, strings, bytes, numbers), it can build only what :data:`ALLOWED_GLOBALS` lists,
exactly (NumPy array and dtype reconstruction, ``OrderedDict``, ``set``, ``frozenset``,
``bytearray``, ``_codecs.encode``). Any other global, and any dotted name (which pickle protocol 4
would resolve attribute by attribute, e.g. ``numpy.dtypes`` + ``__loader__.set_data``, a file
writer), is refused before it is looked up. This stops a tampered file from calling functions; it
does not stop one from using much memory or time (huge arrays, deep nesting). It must fit in memory
(about 2 GB for the full file): pickles cannot be streamed.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from ambiseg_monai.data.datalist import split_patients

from . import common

__all__ = ["load_pickle", "ambdiffseg_split", "convert_entry", "prepare_lidc_pickle", "configure_parser", "main"]

# Exactly these (module, name) pairs: what NumPy (1.x: numpy.core, 2.x: numpy._core) and Python
# write when pickling dicts of arrays. No prefix or wildcard: a module's other attributes stay out.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    }
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and builtin containers; refuses any other class or function.

    ``find_class`` is the only way a pickle reaches a Python object by name. A name with a dot is
    refused outright: the base class would walk it attribute by attribute (protocol >= 4), from an
    allowed module to anything reachable from it.
    """

    def find_class(self, module: str, name: str):
        if "." not in name and (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only NumPy arrays are expected)")


def load_pickle(path: str | os.PathLike) -> dict:
    """Load the community pickle safely; :class:`common.InputError` names the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LIDC pickle not found")
    try:
        with open(path, "rb") as handle:
            data = _NumpyOnlyUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as error:
        raise common.InputError(f"{path}: not a readable LIDC pickle ({error})") from error
    if not isinstance(data, dict) or not data:
        raise common.InputError(f"{path}: expected a non-empty dict of key -> {{image, masks, series_uid}}")
    return data


def ambdiffseg_split() -> tuple[set[str], set[str]]:
    """The AmbDiffSeg validation and test patient ids shipped with the package."""
    folder = importlib.resources.files("ambiseg_monai.preprocessing") / "data" / "lidc_split"

    def read(name: str) -> set[str]:
        return {line.strip() for line in (folder / name).read_text().splitlines() if line.strip()}

    return read("vali_ids.txt"), read("test_ids.txt")


def patient_of(key: str) -> str:
    """The patient part of a pickle key (before the first underscore)."""
    return str(key).split("_")[0]


def convert_entry(entry: tuple[str, str, dict]) -> common.Sample:
    """One pickle entry ``(source, key, value)`` -> sample; :class:`common.InputError` names the key."""
    source, key, value = entry
    where = f"{source} [{key}]"
    if not isinstance(value, dict) or "image" not in value or "masks" not in value:
        raise common.InputError(f"{where}: expected a dict with 'image' and 'masks'")
    image = np.asarray(value["image"], dtype=np.float32)
    try:
        masks = np.asarray(value["masks"])
    except ValueError as error:  # ragged list of masks
        raise common.InputError(f"{where}: masks must be R x H x W ({error})") from None
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise common.InputError(f"{where}: image must be H x W, got shape {image.shape}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape:
        raise common.InputError(
            f"{where}: masks must be R x {image.shape[0]} x {image.shape[1]}, got shape {masks.shape}"
        )
    common.check_finite(image, where)
    label = np.stack([common.check_binary_mask(mask, f"{where} mask {rater + 1}") for rater, mask in enumerate(masks)])
    case_id = re.sub(r"[^A-Za-z0-9_.-]", "_", str(key))
    metadata = {"source_key": str(key)}
    if "series_uid" in value:
        metadata["series_uid"] = str(value["series_uid"])
    return common.Sample(case_id, patient_of(key), image[None], label, metadata)


def prepare_lidc_pickle(
    source: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "ambdiffseg",
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> common.ImportSummary:
    """Convert the pickle into a dataset at ``out``; returns the summary."""
    if split not in ("ambdiffseg", "seeded"):
        raise ValueError(f"--split must be 'ambdiffseg' or 'seeded', got '{split}'")
    options: dict[str, Any] = {"split": split, "normalisation": "as in the pickle ([0, 1]), unchanged"}
    if split == "seeded":
        options.update(split_fractions=list(split_fractions), seed=seed)
    summary = common.ImportSummary("lidc-pickle", options)
    writer = common.open_dataset(
        out, "lidc", "CT", 4, 1, overwrite, "community LIDC pickle (data_lidc.pickle)", options
    )
    job = common.ImportJob(writer, summary, source, strict, progress)
    data = load_pickle(source)
    patients = sorted({patient_of(key) for key in data})
    if split == "ambdiffseg":
        validation, test = ambdiffseg_split()
        split_of = {p: "test" if p in test else "validation" if p in validation else "training" for p in patients}
        missing = len((validation | test) - set(patients))
        if missing:
            summary.warn(f"{missing} validation/test patients of the AmbDiffSeg split are not in {source}")
    else:
        split_of = split_patients(patients, split_fractions, seed)
    entries = [(os.fspath(source), key, value) for key, value in data.items()]

    def record(sample: common.Sample) -> None:
        job.write([sample], split_of)

    return job.run(convert_entry, entries, lambda e: f"{e[0]} [{e[1]}]", record, desc="LIDC pickle")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ambiseg prepare lidc-pickle``."""
    parser.add_argument("--source", required=True, help="the community pickle (data_lidc.pickle)")
    parser.add_argument(
        "--split",
        choices=("ambdiffseg", "seeded"),
        default="ambdiffseg",
        help="patient split: the AmbDiffSeg id lists shipped with the package (default) or a seeded draw",
    )
    common.add_split_arguments(parser)
    common.add_output_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run ``ambiseg prepare lidc-pickle``."""
    return common.run_import(prepare_lidc_pickle, args)
