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
place; SIGTERM / SIGINT remove the temporary folder; a temporary folder left by a killed process
is removed by the next writer of the same dataset) and every bundle reads through
:func:`load_datalist` / :func:`load_split`, after :func:`validate_datalist` (which, at training
start, also checks label values, image finiteness and image sizes, and remembers the files it
has checked so that unchanged files are read once).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ambiseg_monai.data.nifti import load_channel_first_nifti, nifti_channel_first_shape, save_channel_first_nifti

__all__ = [
    "DATALIST_FILENAME",
    "VALIDATION_CACHE_FILENAME",
    "OWNER_FILENAME",
    "SPLITS",
    "DatalistError",
    "DatasetExistsError",
    "DatasetWriteError",
    "DatasetInterrupted",
    "DatasetWriter",
    "check_sample_arrays",
    "load_datalist",
    "load_split",
    "split_patients",
    "item_num_raters",
    "max_num_raters",
    "validate_datalist",
    "write_json_atomic",
]

DATALIST_FILENAME = "datalist.json"
# per-file results of validate_datalist(cache=True), kept in the dataset folder
VALIDATION_CACHE_FILENAME = ".validation_cache.json"
# written into a writer's temporary folder: which process owns it (stale-folder cleanup)
OWNER_FILENAME = ".ambiseg_owner.json"
SPLITS = ("training", "validation", "test")
REQUIRED_TOP_KEYS = ("name", "modality", "num_raters", "image_channels")
REQUIRED_ITEM_KEYS = ("image", "label", "case_id", "patient_id")


class DatalistError(ValueError):
    """A dataset does not satisfy the data contract; the message names the file and the item."""


class DatasetExistsError(FileExistsError):
    """The output folder already holds a dataset and overwriting was not requested."""


class DatasetWriteError(ValueError):
    """The output folder cannot be written (read-only file system, no permission, disk full).

    A ``ValueError`` so that the command line reports it in one line; the message names the path
    and says what to do.
    """


class DatasetInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived while a dataset was being written (its temporary folder is removed).

    ``signum`` is the signal, so that a command line can exit with the shell's ``128 + signum``.
    """

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


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


def _label_problem(values: np.ndarray) -> str | None:
    """Why label values (the unique values of an R x H x W label) break the contract, or None."""
    values = np.asarray(values)
    if np.isin(values, (0, 1)).all():
        return None
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (f", ... ({values.size} values)" if values.size > 6 else "")
    return f"is not binary (values {shown})"


def _image_problem(image: np.ndarray) -> str | None:
    """Why an image's pixels break the contract (NaN / infinite values), or None."""
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    return f"contains {bad} NaN or infinite pixel(s)" if bad else None


def check_sample_arrays(
    image: np.ndarray, label: np.ndarray, image_channels: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check one sample against the contract before it is written; returns (float32 image, uint8 label).

    Args:
        image: C x H x W image (C must be ``image_channels``), finite.
        label: R x H x W rater masks with values in {0, 1}.
        image_channels: the dataset's channel count.
        where: names the sample in messages (e.g. ``"case 'a' (training)"``).

    Raises:
        DatalistError: naming ``where`` and the problem.
    """
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    if image.ndim != 3 or label.ndim != 3:
        raise DatalistError(
            f"{where}: image must be C x H x W and label R x H x W, got {image.shape} and {label.shape}"
        )
    if image.shape[1:] != label.shape[1:]:
        raise DatalistError(f"{where}: image {image.shape[1:]} and label {label.shape[1:]} sizes differ")
    if image.shape[0] != image_channels:
        raise DatalistError(f"{where}: image has {image.shape[0]} channels, dataset has {image_channels}")
    problem = _image_problem(image)
    if problem:
        raise DatalistError(f"{where}: image {problem}")
    problem = _label_problem(np.unique(label))
    if problem:
        raise DatalistError(f"{where}: label {problem}")
    return image, label.astype(np.uint8)


# -- validation ------------------------------------------------------------------------------------
# A file whose mtime is this close to the start of a check is not remembered: a rewrite within the
# file system's timestamp granularity could keep size and mtime ("racily clean", as git calls it).
_RACY_NS = 2_000_000_000
_CACHE_VERSION = 1


class _FileChecks:
    """The per-file part of :func:`validate_datalist`: C x H x W shape from the header and, with
    ``contents``, label values or image finiteness from the data.

    With ``use_cache`` the results are remembered in ``<dataset_dir>/.validation_cache.json``,
    keyed by the file's relative path, size and modification time, so that an unchanged file is
    read once, not at every training start (checks of the datalist itself are always redone).
    A folder that cannot be written simply gets no cache.
    """

    def __init__(self, dataset_dir: Path, use_cache: bool) -> None:
        self.path = dataset_dir / VALIDATION_CACHE_FILENAME
        self.use_cache = use_cache
        self.started_ns = time.time_ns()
        self.known: dict[str, dict] = self._load() if use_cache else {}
        self.checked: dict[str, dict] = {}
        self.reads = 0  # files opened beyond their header (for tests and benchmarks)

    def _load(self) -> dict[str, dict]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
            return {}
        if not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

    def shape(self, file: Path, relative: str, kind: str, where: str, contents: bool) -> tuple[int, int, int]:
        """Check ``file`` (``kind``: ``"image"`` or ``"label"``) and return its C x H x W shape."""
        stat = file.stat()
        key = [stat.st_size, stat.st_mtime_ns]
        entry = self.known.get(relative)
        if (
            entry is not None
            and entry.get("key") == key
            and entry.get("kind") == kind
            and (entry.get("contents") or not contents)
        ):
            self.checked[relative] = entry
            channels, height, width = entry["shape"]
            return int(channels), int(height), int(width)
        try:
            if contents:
                self.reads += 1
                data, _ = load_channel_first_nifti(file)
                channels, height, width = data.shape  # C x H x W, checked by the loader
                shape = (int(channels), int(height), int(width))
            else:
                shape = nifti_channel_first_shape(file)
        except ValueError as error:
            raise DatalistError(f"{where}: {error}") from error
        if contents:
            problem = _label_problem(np.unique(data)) if kind == "label" else _image_problem(data)
            if problem:
                advice = (
                    "labels hold one 0/1 mask per rater" if kind == "label" else "images must be finite"
                ) + ": re-run `ambiseg prepare` on the raw data, or fix this file"
                raise DatalistError(f"{where}: {kind} {file} {problem}; {advice}")
        if stat.st_mtime_ns < self.started_ns - _RACY_NS:
            self.checked[relative] = {"key": key, "kind": kind, "shape": list(shape), "contents": contents}
        return shape

    def save(self, complete: bool = True) -> None:
        """Remember the files checked this time (only when something changed).

        After a complete check the cache holds exactly the files checked (entries of files no longer
        in the datalist go); after an interrupted one, the earlier entries are kept as well.
        """
        files = self.checked if complete else {**self.known, **self.checked}
        if not self.use_cache or files == self.known:
            return
        try:
            write_json_atomic(self.path, {"version": _CACHE_VERSION, "files": files})
        except OSError:
            pass  # a read-only dataset: checked again next time


def validate_datalist(
    dataset_dir: str | os.PathLike,
    datalist: dict | None = None,
    required_splits: Sequence[str] = (),
    check_files: bool = True,
    check_contents: bool = True,
    check_sizes: bool = False,
    cache: bool = False,
) -> dict:
    """Check a dataset against the contract and return a summary.

    Args:
        dataset_dir: the dataset folder (paths in the datalist are relative to it).
        datalist: the parsed datalist; read from ``dataset_dir`` when omitted.
        required_splits: splits that must exist and be non-empty (e.g. what a bundle trains on).
        check_files: check that the files exist and that image and label shapes agree.
        check_contents: also read the files: labels must hold only 0 and 1, images only finite
            values.
        check_sizes: every item of a split must have the same H x W (a batch needs one size);
            the odd files are named.
        cache: remember the per-file results in ``<dataset_dir>/.validation_cache.json`` (keyed
            by path, size and modification time) so that unchanged files are not read again.

    Returns:
        ``{"num_items": {split: n}, "num_patients": {split: n}, "raters": {count: n},
        "files_read": n}`` (``files_read``: files whose contents were read, not taken from the cache).

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

    checks = _FileChecks(dataset_dir, cache and check_files)
    rater_counts: dict[int, int] = {}
    sizes: dict[str, list[tuple[tuple[int, int], str]]] = {split: [] for split in SPLITS}
    try:
        _check_items(dataset_dir, datalist, path, check_files, check_contents, checks, rater_counts, sizes)
    except BaseException:
        checks.save(complete=False)  # keep what was verified: the next attempt reads only the rest
        raise
    checks.save()
    if check_files and check_sizes:
        for split in SPLITS:
            _check_one_size(path, split, sizes[split])

    return {
        "num_items": {split: len(datalist.get(split, [])) for split in SPLITS},
        "num_patients": {split: len({str(item["patient_id"]) for item in datalist.get(split, [])}) for split in SPLITS},
        "raters": dict(sorted(rater_counts.items())),
        "files_read": checks.reads,
    }


def _check_items(
    dataset_dir: Path,
    datalist: dict,
    path: Path,
    check_files: bool,
    check_contents: bool,
    checks: _FileChecks,
    rater_counts: dict[int, int],
    sizes: dict[str, list[tuple[tuple[int, int], str]]],
) -> None:
    """The per-item part of :func:`validate_datalist` (fills ``rater_counts`` and ``sizes``)."""
    seen_cases: dict[str, str] = {}
    patient_split: dict[str, str] = {}
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
                size = _check_item_files(dataset_dir, datalist, item, where, expected_raters, check_contents, checks)
                sizes[split].append((size, str(item["image"])))


def _check_one_size(path: Path, split: str, sizes: list[tuple[tuple[int, int], str]]) -> None:
    """All items of a split share one H x W; otherwise name the files that differ from the most common size."""
    counts = Counter(size for size, _ in sizes)
    if len(counts) < 2:
        return
    (common, count), *_ = counts.most_common(1)
    odd = [(size, image) for size, image in sizes if size != common]
    shown = ", ".join(f"{image} is {size[0]} x {size[1]}" for size, image in odd[:3])
    more = f" (and {len(odd) - 3} more)" if len(odd) > 3 else ""
    raise DatalistError(
        f"{path}: split '{split}' mixes image sizes: {shown}{more}, but {count} of its {len(sizes)} items are "
        f"{common[0]} x {common[1]}; a batch needs one size: prepare the dataset again with --size H W "
        "(or resize in the bundle's transforms and call prepare_dataset(..., same_size=False))"
    )


def _check_item_files(
    dataset_dir: Path,
    datalist: dict,
    item: dict,
    where: str,
    expected_raters: int,
    check_contents: bool,
    checks: _FileChecks,
) -> tuple[int, int]:
    """Check one item's two files; returns the image's (H, W)."""
    image_file, label_file = dataset_dir / item["image"], dataset_dir / item["label"]
    for kind, file in (("image", image_file), ("label", label_file)):
        if not file.is_file():
            raise DatalistError(f"{where}: {kind} file {file} does not exist")
    image_shape = checks.shape(image_file, str(item["image"]), "image", where, check_contents)
    label_shape = checks.shape(label_file, str(item["label"]), "label", where, check_contents)
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
    return int(image_shape[1]), int(image_shape[2])


# -- interruption and ownership of the temporary folder --------------------------------------------
class _SignalGuard:
    """While installed, SIGTERM and SIGINT raise :class:`DatasetInterrupted` in the main thread, so
    the writer's ``with`` block unwinds and removes its temporary folder (the default SIGTERM
    action would kill the process on the spot and leave the folder behind).

    In a critical section (the cleanup, the final renames) a signal is only recorded; it is sent
    again, to the handler that was there before, once the guard is removed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.critical = False
        self.pending: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; Python delivers signals there anyway
        for signum in self.SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError):  # e.g. an embedded interpreter
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.critical:
            self.pending = signum
            return
        self.critical = True  # a second signal must not interrupt the cleanup this one starts
        raise DatasetInterrupted(f"interrupted by {signal.Signals(signum).name}", signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}
        pending, self.pending = self.pending, None
        if pending is not None:
            signal.raise_signal(pending)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process from Linux ``/proc``; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # fields 1-2 end at ')'
        return fields[0], int(fields[19])  # fields 3 and 22 of stat
    except (OSError, ValueError, IndexError):
        return None


def _process_start_time(pid: int) -> int | None:
    stat = _process_stat(pid)
    return None if stat is None else stat[1]


def _owner_record() -> dict:
    """Who writes this temporary folder: enough to prove later that the writer is gone."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start_time": _process_start_time(os.getpid()),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _abandoned_because(owner: dict) -> str | None:
    """Why the process that owned a temporary folder certainly no longer runs, or None if it may run.

    Only a process on this machine can be checked; a folder from another host is never claimed.
    """
    if owner.get("host") != socket.gethostname():
        return None
    boot_id = _boot_id()
    if owner.get("boot_id") and boot_id and owner["boot_id"] != boot_id:
        return "the machine has restarted since it was written"
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid}, which wrote it, no longer runs"
    except OSError:  # e.g. another user's live process
        return None
    stat = _process_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):  # dead, not yet reaped by its parent
        return f"process {pid}, which wrote it, no longer runs"
    if owner.get("start_time") is not None and stat is not None and stat[1] != owner["start_time"]:
        return f"process {pid}, which wrote it, no longer runs (its id now belongs to another process)"
    return None


class DatasetWriter:
    """Write a dataset atomically: everything goes to a temporary folder next to ``out_dir``,
    which is validated and renamed into place only when the ``with`` block succeeds.

    An exception inside the block (or in validation) removes the temporary folder, so an
    interrupted import never leaves a half-written dataset that looks complete. SIGTERM and SIGINT
    (Ctrl-C) raise :class:`DatasetInterrupted` (a ``KeyboardInterrupt``) inside the block, so they
    remove it too. The folder records its owner (``.ambiseg_owner.json``: process id, host, boot
    and process start time); a folder whose owner provably died (``kill -9``, a power cut) is
    removed by the next writer of the same ``out_dir``, and listed in :attr:`stale_removed`.
    Folders that cannot be proven abandoned are kept and listed in :attr:`stale_kept`.
    An existing dataset is replaced only with ``overwrite=True``, and only after the new one is
    complete. Errors of the output file system (read-only, no permission, disk full) raise
    :class:`DatasetWriteError` naming the path.

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
        self._guard: _SignalGuard | None = None
        self.summary: dict | None = None
        self.stale_removed: list[str] = []
        self.stale_kept: list[str] = []

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> DatasetWriter:
        self.check_destination()
        self._guard = _SignalGuard()
        self._guard.install()
        try:
            with self._output_errors():
                self.out_dir.parent.mkdir(parents=True, exist_ok=True)
                self._remove_abandoned()
                self._tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
                write_json_atomic(self._tmp_dir / OWNER_FILENAME, _owner_record())
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        """Remove the temporary folder (signals wait until it is gone), then restore the handlers."""
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.critical = True
        try:
            if self._tmp_dir is not None and self._tmp_dir.exists():
                shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
        finally:
            if guard is not None:
                guard.restore()

    @contextlib.contextmanager
    def _output_errors(self) -> Iterator[None]:
        """Turn an ``OSError`` of the output file system into a :class:`DatasetWriteError`."""
        try:
            yield
        except DatasetExistsError:
            raise
        except OSError as error:
            raise output_error(self.out_dir, error) from error

    def _remove_abandoned(self) -> None:
        """Remove temporary folders of ``out_dir`` whose writer provably died; list the others."""
        for folder in sorted(self.out_dir.parent.glob(f".{self.out_dir.name}.partial-*")):
            if not folder.is_dir():
                continue
            try:
                owner = json.loads((folder / OWNER_FILENAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                owner = None
            reason = _abandoned_because(owner) if isinstance(owner, dict) else None
            if reason is not None:
                shutil.rmtree(folder, ignore_errors=True)
                self.stale_removed.append(f"removed the abandoned temporary folder {folder} ({reason})")
            elif owner is None:
                self.stale_kept.append(
                    f"kept {folder}: it has no owner record (left by an older version, or being created right "
                    "now); delete it if no import into this folder is running"
                )
            else:
                self.stale_kept.append(
                    f"kept {folder}: process {owner.get('pid')} on {owner.get('host')} may still be writing it"
                )

    def check_destination(self) -> None:
        """Refuse (before any work) to replace an existing folder unless ``overwrite``."""
        with self._output_errors():
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
            image: C x H x W float image, normalised as the importer documents (finite).
            label: R x H x W binary rater masks (an empty mask is a valid opinion).
            affine: optional 4 x 4 voxel-to-world matrix written into both files.
            extra: per-item metadata stored in the datalist (JSON-serialisable).

        Returns:
            The datalist item (paths relative to the dataset folder).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}', expected one of {SPLITS}")
        image, label = check_sample_arrays(image, label, self.datalist["image_channels"], f"case '{case_id}' ({split})")
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
        self.write_array(item["label"], label, affine)
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
                raise DatalistError(
                    f"case '{item['case_id']}' ({split}): {key} file {self.root / item[key]} was not written"
                )
        self.datalist[split].append(dict(item))
        return item

    def write_array(self, relative_path: str, array: np.ndarray, affine: np.ndarray | None = None) -> str:
        """Write an extra C x H x W array (e.g. ground-truth masks) inside the dataset."""
        destination = self.root / relative_path
        with self._output_errors():
            destination.parent.mkdir(parents=True, exist_ok=True)
            save_channel_first_nifti(destination, array, affine)
        return relative_path

    def write_text(self, relative_path: str, text: str) -> str:
        """Write an extra text file (e.g. an import summary) inside the dataset."""
        destination = self.root / relative_path
        with self._output_errors():
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(text, encoding="utf-8")
        return relative_path

    def _commit(self) -> None:
        with self._output_errors():
            write_json_atomic(self.root / DATALIST_FILENAME, self.datalist)
        self.summary = validate_datalist(self.root, self.datalist, required_splits=self.required_splits)
        self.check_destination()  # the folder may have appeared while we were writing
        if self._guard is not None:
            self._guard.critical = True  # from here on a signal waits until the renames are done
        with self._output_errors():
            (self.root / OWNER_FILENAME).unlink(missing_ok=True)
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


def output_error(out_dir: str | os.PathLike, error: OSError) -> DatasetWriteError:
    """A short :class:`DatasetWriteError` for an ``OSError`` met while writing a dataset to ``out_dir``."""
    where = f" ({error.filename})" if error.filename and os.fspath(error.filename) != os.fspath(out_dir) else ""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        advice = "free some disk space or choose another output folder (--out)"
    else:
        advice = "choose a writable output folder (--out), or fix the permissions of this one"
    return DatasetWriteError(f"cannot write the dataset {out_dir}: {reason}{where}; {advice}")


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
    for split, count in zip(SPLITS, counts, strict=True):
        for position in order[start : start + count]:
            assignment[patients[position]] = split
        start += count
    return assignment
