"""What every importer shares: command-line options, the skip-or-fail policy, parallel workers,
progress bars, image resizing/normalisation and the end-of-import summary.

An importer is a loop over *tasks* (one scan, one time point, one case): a worker function turns a
task into samples (small C x H x W / R x H x W arrays), and the parent process writes them through
:class:`ambiseg_monai.data.datalist.DatasetWriter`. Workers run in a ``ProcessPoolExecutor`` with a
bounded look-ahead, so memory holds at most a few tasks' samples, never the dataset. Every importer
opens its dataset with :func:`open_dataset`, runs that loop with :meth:`ImportJob.run` and ends its
``main`` with :func:`run_import`. For the heavy
importers the workers also write the samples' NIfTI files into the writer's temporary folder
(:class:`WriteInWorker`), and the parent only records the items, so compression runs in parallel.

A task that fails (corrupt file, bad annotation, ...) is reported and skipped, so one broken scan
does not abort a 1000-scan import; ``--strict`` makes the first failure fatal instead. A failure to
write the output (read-only file system, disk full: :class:`DatasetWriteError`) is always fatal.

Every importer checks what it reads with the same two functions: :func:`check_binary_mask` (a
stored mask must be 0/1, 0/255 or boolean; anything else - soft values, a stray 255 in a 0/1 mask,
NaN - is an error naming the file and the values found) and :func:`check_finite` (no NaN or
infinite value in an image or volume).

Worker processes die with their parent: they ignore SIGINT (the parent handles Ctrl-C), take the
default action on SIGTERM, ask the kernel to kill them when the parent dies (Linux
``PR_SET_PDEATHSIG``) and, as a fallback elsewhere, exit when their parent process changes. On any
interruption or error the parent kills its workers before the temporary folder is removed.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.transform import resize
from tqdm import tqdm

from ambiseg_monai.data.datalist import (
    SPLITS,
    DatalistError,
    DatasetWriteError,
    DatasetWriter,
    check_sample_arrays,
    output_error,
)
from ambiseg_monai.data.nifti import save_channel_first_nifti

__all__ = [
    "ImportFailedError",
    "InputError",
    "Sample",
    "TaskFailure",
    "ImportSummary",
    "add_output_arguments",
    "add_split_arguments",
    "add_worker_arguments",
    "add_size_argument",
    "run_import",
    "open_dataset",
    "ImportJob",
    "run_tasks",
    "write_samples",
    "WrittenSample",
    "WriteInWorker",
    "write_sample_files",
    "register_written_samples",
    "finish_import",
    "image_size",
    "resize_image",
    "resize_masks",
    "normalise_minmax",
    "check_binary_mask",
    "check_finite",
    "SUMMARY_FILENAME",
]

SUMMARY_FILENAME = "summary.json"


class InputError(ValueError):
    """A raw input file is missing, corrupt or inconsistent; the message names the file."""


class ImportFailedError(InputError):
    """A task failed under ``--strict``, or no sample at all could be produced."""


@dataclass
class Sample:
    """One 2D sample produced by a worker, ready for :meth:`DatasetWriter.add_item`.

    Attributes:
        case_id: unique id (also the file stem).
        patient_id: the patient (splits are by patient).
        image: C x H x W float32, normalised as the importer documents.
        label: R x H x W uint8 {0, 1}, one mask per rater (empty masks allowed).
        metadata: JSON-serialisable per-item metadata stored in the datalist.
        affine: optional 4 x 4 voxel-to-world matrix (e.g. carrying the pixel spacing).
        split: the split, when the worker knows it (otherwise the parent assigns it by patient).
    """

    case_id: str
    patient_id: str
    image: np.ndarray
    label: np.ndarray
    metadata: dict = field(default_factory=dict)
    affine: np.ndarray | None = None
    split: str | None = None


@dataclass
class TaskFailure:
    """A task that could not be processed: where (a file or folder) and why."""

    source: str
    message: str


# -- command-line options shared by the importers ------------------------------------------------
def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--overwrite``, ``--strict``, ``--no-progress``."""
    parser.add_argument("--out", required=True, help="folder to write the prepared dataset to (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first broken input instead of reporting and skipping it"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``."""
    parser.add_argument(
        "--workers", type=int, default=1, help="parallel worker processes (1: run in this process; default 1)"
    )


def add_split_arguments(parser: argparse.ArgumentParser, default: Sequence[float] = (0.6, 0.2, 0.2)) -> None:
    """``--split-fractions`` and ``--seed`` for the seeded patient-level split."""
    parser.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        default=list(default),
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of patients in training/validation/test (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")


def add_size_argument(
    parser: argparse.ArgumentParser, default: Sequence[int] | None = None, help: str = "resize every case"
) -> None:
    """``--size H W``: the height and width of the written samples (read with :func:`image_size`)."""
    parser.add_argument(
        "--size", type=int, nargs=2, default=list(default) if default else None, metavar=("H", "W"), help=help
    )


def run_import(prepare: Callable[..., ImportSummary], args: argparse.Namespace, **keywords: Any) -> int:
    """The end of every importer's ``main``: run its ``prepare_*`` function and report.

    Calls ``prepare`` with every parameter of its signature that ``args`` holds under the same name
    (the command-line options, including ``strict``, ``overwrite`` and ``progress`` of
    :func:`add_output_arguments`; a list, as argparse gives ``nargs`` options, becomes a tuple),
    then ``keywords`` (parameters named otherwise on the command line, or built from several
    options), prints the summary (:meth:`ImportSummary.format`) and ``wrote OUT``; returns the exit
    status 0.
    """
    values = {name: getattr(args, name) for name in inspect.signature(prepare).parameters if hasattr(args, name)}
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}
    summary = prepare(**{**values, **keywords})
    print(summary.format())
    print(f"wrote {args.out}")
    return 0


# -- running tasks ---------------------------------------------------------------------------------
def open_dataset(
    out: str | os.PathLike,
    name: str,
    modality: str,
    num_raters: int,
    image_channels: int,
    overwrite: bool,
    source: str,
    options: dict,
) -> DatasetWriter:
    """The importer's :class:`DatasetWriter`, its destination already checked (before any long work).

    The datalist records ``source`` (a description of the raw data) and ``options`` (the
    preprocessing options, the same dict as in the summary) as ``{"source": ..., "preprocessing": ...}``.
    """
    writer = DatasetWriter(
        out,
        name=name,
        modality=modality,
        num_raters=num_raters,
        image_channels=image_channels,
        overwrite=overwrite,
        metadata={"source": source, "preprocessing": options},
    )
    writer.check_destination()
    return writer


@dataclass
class ImportJob:
    """One import under way: the dataset it writes, its summary, its input and how its tasks run.

    Every importer builds one after :func:`open_dataset` from its ``prepare_*`` arguments
    (``strict``, ``progress`` and, for the parallel ones, ``workers``), writes (:meth:`write`) or
    registers (:meth:`register`) the samples of each task's result in its ``record`` function, and
    ends with :meth:`run`. ``source`` names the input in the errors of :func:`finish_import`.
    """

    writer: DatasetWriter
    summary: ImportSummary
    source: str | os.PathLike
    strict: bool = False
    progress: bool = True
    workers: int = 1

    def write(
        self, samples: Iterable[Sample], split_of_patient: Callable[[str], str] | dict[str, str] | None = None
    ) -> int:
        """:func:`write_samples` into this job's dataset and summary."""
        return write_samples(self.writer, self.summary, samples, split_of_patient)

    def register(
        self, written: Iterable[WrittenSample], split_of_patient: Callable[[str], str] | dict[str, str] | None = None
    ) -> int:
        """:func:`register_written_samples` into this job's dataset and summary."""
        return register_written_samples(self.writer, self.summary, written, split_of_patient)

    def run(
        self,
        function: Callable[[Any], Any],
        tasks: Sequence[Any],
        describe: Callable[[Any], str],
        record: Callable[[Any], object],
        *,
        desc: str = "processing",
        write_in_worker: bool = False,
    ) -> ImportSummary:
        """The body every importer shares: write the dataset from the results of its tasks.

        Inside the writer's ``with`` block, runs ``function`` over ``tasks`` (:func:`run_tasks`,
        with this job's ``workers``, ``strict`` and ``progress``; ``describe`` names a task's source,
        ``desc`` labels the progress bar; the skipped tasks go to the summary), hands every result to
        ``record`` (which writes or registers its samples, and counts what the importer counts),
        then :func:`finish_import`. Returns the summary.

        With ``write_in_worker``, ``function`` is wrapped in :class:`WriteInWorker` (with the
        writer's temporary folder, rater count and image channels), so its results hold
        :class:`WrittenSample` for :meth:`register` instead of :class:`Sample`.
        """
        with self.writer:
            if write_in_worker:
                datalist = self.writer.datalist
                function = WriteInWorker(
                    function, os.fspath(self.writer.root), datalist["num_raters"], datalist["image_channels"]
                )
            for _, result in run_tasks(
                function,
                tasks,
                describe,
                workers=self.workers,
                strict=self.strict,
                progress=self.progress,
                desc=desc,
                on_failure=self.summary.record_failure,
            ):
                record(result)
            finish_import(self.writer, self.summary, self.source)
        return self.summary


def _call_safely(function: Callable[[Any], Any], task: Any) -> tuple[bool, Any]:
    """Run one task, turning any exception into a message (exceptions may not pickle back)."""
    try:
        return True, function(task)
    except (KeyboardInterrupt, SystemExit, DatasetWriteError):  # the output cannot be written: fatal
        raise
    except (InputError, OSError) as error:  # expected input problems: the message names the file
        return False, str(error)
    except Exception as error:  # noqa: BLE001 - a bug or an unforeseen format quirk: keep the traceback's last line
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return False, f"unexpected {last}"


def run_tasks(
    function: Callable[[Any], Any],
    tasks: Sequence[Any],
    describe: Callable[[Any], str],
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    desc: str = "processing",
    on_failure: Callable[[TaskFailure], None] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(task, result)`` for every task that succeeds, in task order.

    Args:
        function: a picklable top-level function ``task -> result`` (runs in a worker process when
            ``workers > 1``).
        tasks: the tasks (small, picklable descriptions: paths and options).
        describe: ``task -> str`` naming the task's source (a file or folder) in messages.
        workers: number of processes; 1 runs everything in this process.
        strict: raise :class:`ImportFailedError` at the first failure instead of skipping.
        progress: show a tqdm progress bar (on stderr).
        desc: the progress bar's label.
        on_failure: called with a :class:`TaskFailure` for each skipped task.

    Only ``2 * workers`` tasks are in flight at once, so at most that many tasks' results are held
    in memory while waiting for an earlier one (results are yielded in order: output is
    deterministic whatever the number of workers).
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def handle(task: Any, ok: bool, payload: Any) -> Iterator[tuple[Any, Any]]:
        bar.update(1)
        if ok:
            yield task, payload
            return
        source = describe(task)
        message = payload if source in payload else f"{source}: {payload}"
        if strict:
            raise ImportFailedError(f"{message} (stopped because of --strict)")
        bar.write(f"skipped: {message}", file=sys.stderr)
        if on_failure is not None:
            on_failure(TaskFailure(source, message))

    try:
        if workers == 1:
            for task in tasks:
                yield from handle(task, *_call_safely(function, task))
            return
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            pending: list[tuple[Any, Future]] = []
            iterator = iter(tasks)
            try:
                for task in iterator:
                    pending.append((task, pool.submit(_call_safely, function, task)))
                    if len(pending) >= 2 * workers:
                        done_task, future = pending.pop(0)
                        yield from handle(done_task, *future.result())
                for done_task, future in pending:
                    yield from handle(done_task, *future.result())
            except BaseException:
                # Stop the workers now (they write into a folder that is about to be removed), then wait
                # for them, so that nothing writes there once the caller cleans up. The pending futures
                # are not cancelled: the pool, broken by the kill, fails them itself (cancelling them as
                # well makes Python 3.11's pool manager thread crash with InvalidStateError).
                _kill_workers(pool)
                pool.shutdown(wait=True)
                raise
    finally:
        bar.close()


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the pool's worker processes (``ProcessPoolExecutor`` has no public way before 3.14)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.kill()
        except (OSError, ValueError, AttributeError):  # already gone or closed
            pass


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _worker_init(parent_pid: int) -> None:
    """Runs first in every worker process: make it die with its parent, leave signals to the parent.

    * SIGINT is ignored: Ctrl-C reaches the whole process group, and the parent, which owns the
      temporary folder, stops the workers itself;
    * SIGTERM takes its default action (the parent's cleanup handler is not inherited);
    * on Linux the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``), so a
      ``kill -9`` of the import does not leave workers writing and then waiting forever;
    * everywhere, a daemon thread exits the worker within half a second when its parent changes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid and not _alive(parent_pid):
        os._exit(1)  # the importer died before this worker started
    parent = os.getppid()  # the importer (fork, spawn) or the forkserver, which dies with it

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # re-parented: the importer is gone

    threading.Thread(target=watch, name="ambiseg-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# -- the summary ----------------------------------------------------------------------------------
class ImportSummary:
    """Counts what was written and what was skipped; written as ``summary.json`` next to the datalist.

    Reports samples and patients per split, the rater count per sample, the fraction of empty
    rater masks (per split), the skipped inputs with their reasons, and importer-specific counts.
    """

    def __init__(self, dataset: str, options: dict | None = None) -> None:
        self.dataset = dataset
        self.options = options or {}
        self.samples: Counter[str] = Counter()
        self.patients: dict[str, set[str]] = defaultdict(set)
        self.raters: Counter[int] = Counter()
        self.masks: Counter[str] = Counter()
        self.empty_masks: Counter[str] = Counter()
        self.skipped: list[dict] = []
        self.warnings: list[str] = []
        self.counts: Counter[str] = Counter()
        self.sizes: dict[str, dict[tuple[int, int], str]] = defaultdict(dict)  # split -> H x W -> a case

    def record_sample(self, split: str, patient_id: str, label: np.ndarray, case_id: str = "") -> None:
        """Count one written sample (``label``: R x H x W)."""
        self.record_counts(split, patient_id, int(label.shape[0]), _count_empty(label), tuple(label.shape[1:]), case_id)

    def record_counts(
        self,
        split: str,
        patient_id: str,
        num_raters: int,
        empty_masks: int,
        size: tuple[int, int] | None = None,
        case_id: str = "",
    ) -> None:
        """Count one written sample from its rater count, number of empty masks and H x W."""
        if size is not None:
            self.sizes[split].setdefault((int(size[0]), int(size[1])), case_id)
        self.samples[split] += 1
        self.patients[split].add(str(patient_id))
        self.raters[num_raters] += 1
        self.masks[split] += num_raters
        self.empty_masks[split] += empty_masks

    def record_failure(self, failure: TaskFailure) -> None:
        self.skipped.append({"source": failure.source, "reason": failure.message})

    def skip_input(self, message: str, strict: bool) -> None:
        """The skip-or-fail policy for a broken input found outside :func:`run_tasks`.

        ``message`` starts with the input's path (``"<source>: what is wrong"``); it is listed as
        skipped (its source: the text before the first colon) or, with ``strict``, raised as
        :class:`InputError` ``"<message> (stopped because of --strict)"``.
        """
        if strict:
            raise InputError(f"{message} (stopped because of --strict)")
        self.skipped.append({"source": message.split(":", 1)[0], "reason": message})

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def count(self, key: str, amount: int = 1) -> None:
        """Importer-specific counters (e.g. ``point_only_marks_skipped``)."""
        self.counts[key] += amount

    def to_dict(self) -> dict:
        total_masks = sum(self.masks.values())
        return {
            "dataset": self.dataset,
            "samples": {split: self.samples[split] for split in SPLITS},
            "patients": {split: len(self.patients[split]) for split in SPLITS},
            "raters_per_sample": {str(k): v for k, v in sorted(self.raters.items())},
            "empty_mask_fraction": {
                **{
                    split: (self.empty_masks[split] / self.masks[split] if self.masks[split] else None)
                    for split in SPLITS
                },
                "all": sum(self.empty_masks.values()) / total_masks if total_masks else None,
            },
            "skipped": self.skipped,
            "warnings": self.warnings,
            "counts": dict(sorted(self.counts.items())),
            "options": self.options,
        }

    def format(self) -> str:
        """A short human-readable report."""
        data = self.to_dict()
        lines = [f"prepared '{self.dataset}':"]
        for split in SPLITS:
            fraction = data["empty_mask_fraction"][split]
            empty = "-" if fraction is None else f"{fraction:.1%}"
            lines.append(
                f"  {split:<10} {data['samples'][split]:>7} samples  {data['patients'][split]:>5} patients"
                f"  empty rater masks {empty}"
            )
        raters = ", ".join(f"{k} raters: {v}" for k, v in data["raters_per_sample"].items()) or "none"
        lines.append(f"  samples by rater count: {raters}")
        for key, value in data["counts"].items():
            lines.append(f"  {key.replace('_', ' ')}: {value}")
        if self.warnings:
            lines.append(f"  warnings: {len(self.warnings)} (see {SUMMARY_FILENAME})")
            lines.extend(f"    {warning}" for warning in self.warnings[:5])
        if self.skipped:
            lines.append(f"  skipped inputs: {len(self.skipped)}")
            lines.extend(f"    {entry['reason']}" for entry in self.skipped[:20])
            if len(self.skipped) > 20:
                lines.append(f"    ... and {len(self.skipped) - 20} more (see {SUMMARY_FILENAME})")
        return "\n".join(lines)


def write_samples(
    writer: DatasetWriter,
    summary: ImportSummary,
    samples: Iterable[Sample],
    split_of_patient: Callable[[str], str] | dict[str, str] | None = None,
) -> int:
    """Write samples through ``writer`` and count them in ``summary``; returns how many were written.

    The split is the sample's own ``split`` or ``split_of_patient[patient_id]``.
    """
    written = 0
    for sample in samples:
        split = _split_for(sample.split, sample.patient_id, sample.case_id, split_of_patient)
        label = np.asarray(sample.label).astype(np.uint8)
        writer.add_item(
            split, sample.case_id, sample.patient_id, sample.image, label, affine=sample.affine, **sample.metadata
        )
        summary.record_sample(split, sample.patient_id, label, sample.case_id)
        written += 1
    return written


def _count_empty(label: np.ndarray) -> int:
    return int((~np.asarray(label).reshape(label.shape[0], -1).any(axis=1)).sum())


def _split_for(sample_split: str | None, patient_id: str, case_id: str, split_of) -> str:
    if sample_split is not None:
        return sample_split
    if split_of is None:
        raise ValueError(f"case '{case_id}': no split given")
    return split_of[patient_id] if isinstance(split_of, dict) else split_of(patient_id)


# -- writing in the worker processes ---------------------------------------------------------------
@dataclass
class WrittenSample:
    """A sample whose files a worker already wrote into the dataset's temporary folder.

    ``item`` is the datalist item (relative paths, ids, ``num_raters`` if unusual, metadata).
    """

    item: dict
    split: str | None
    num_raters: int
    empty_masks: int
    size: tuple[int, int] = (0, 0)


def write_sample_files(root: str | os.PathLike, sample: Sample, num_raters: int, image_channels: int) -> WrittenSample:
    """Check a sample as :meth:`DatasetWriter.add_item` does and write its two files under ``root``.

    Used by workers so that NIfTI compression runs in parallel; the parent then only records the
    item (:func:`register_written_samples`). The writer validates every file again at commit.
    """
    try:
        image, label = check_sample_arrays(sample.image, sample.label, image_channels, f"case '{sample.case_id}'")
    except DatalistError as error:  # a worker reports input problems as InputError
        raise InputError(str(error)) from None
    item: dict[str, Any] = {
        "image": f"images/{sample.case_id}.nii.gz",
        "label": f"labels/{sample.case_id}.nii.gz",
        "case_id": str(sample.case_id),
        "patient_id": str(sample.patient_id),
    }
    if label.shape[0] != num_raters:
        item["num_raters"] = int(label.shape[0])
    item.update(sample.metadata)
    for key, array in (("image", image), ("label", label)):
        destination = Path(root) / item[key]
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            save_channel_first_nifti(destination, array, sample.affine)
        except OSError as error:  # the output, not the input: fatal (see run_tasks)
            raise output_error(root, error) from error
    return WrittenSample(item, sample.split, int(label.shape[0]), _count_empty(label), tuple(label.shape[1:]))


@dataclass(frozen=True)
class WriteInWorker:
    """Wrap a task function so that the worker process writes the samples' files itself.

    ``function(task)`` returns a :class:`Sample`, a list of them, or an object with a ``samples``
    list (e.g. with warnings and counters beside). The wrapper returns a list of
    :class:`WrittenSample` in the first two cases, and the object with its ``samples`` replaced by
    their :class:`WrittenSample` in the last. Picklable when ``function`` is a top-level function.
    """

    function: Callable[[Any], Any]
    root: str
    num_raters: int
    image_channels: int

    def _write(self, samples: Iterable[Sample]) -> list[WrittenSample]:
        written: list[WrittenSample] = []
        case_ids: list[str] = []
        try:
            for sample in samples:
                case_ids.append(sample.case_id)
                written.append(write_sample_files(self.root, sample, self.num_raters, self.image_channels))
        except BaseException:  # a skipped task leaves no orphan (or half-written) files in the dataset
            for case_id in case_ids:
                for folder in ("images", "labels"):
                    (Path(self.root) / folder / f"{case_id}.nii.gz").unlink(missing_ok=True)
            raise
        return written

    def __call__(self, task: Any) -> Any:
        result = self.function(task)
        if isinstance(result, Sample):
            return self._write([result])
        if isinstance(result, list):
            return self._write(result)
        result.samples = self._write(result.samples)
        return result


def register_written_samples(
    writer: DatasetWriter,
    summary: ImportSummary,
    written: Iterable[WrittenSample],
    split_of_patient: Callable[[str], str] | dict[str, str] | None = None,
) -> int:
    """Record samples whose files a worker wrote (see :class:`WriteInWorker`); returns how many.

    The writer's commit validates their files with the rest.
    """
    count = 0
    for sample in written:
        item = sample.item
        split = _split_for(sample.split, item["patient_id"], item["case_id"], split_of_patient)
        writer.register_item(split, item)
        summary.record_counts(
            split, item["patient_id"], sample.num_raters, sample.empty_masks, sample.size, item["case_id"]
        )
        count += 1
    return count


def finish_import(writer: DatasetWriter, summary: ImportSummary, source: str | os.PathLike) -> None:
    """Refuse an import that produced nothing, then write ``summary.json`` into the dataset.

    Also records as warnings: temporary folders of earlier, killed imports that the writer removed
    or had to keep, and splits whose samples differ in size (the bundles batch whole images, so
    such a dataset needs ``--size H W`` or a resizing bundle). Call inside the writer's ``with``
    block, after the last sample.
    """
    for note in writer.stale_removed + writer.stale_kept:
        summary.warn(note)
    for split in SPLITS:
        sizes = summary.sizes.get(split, {})
        if len(sizes) > 1:
            shown = ", ".join(f"{h} x {w} ({case})" for (h, w), case in list(sizes.items())[:4])
            summary.warn(
                f"split '{split}' mixes {len(sizes)} image sizes, e.g. {shown}; bundles batch whole images: "
                "prepare again with --size H W unless the bundle resizes its inputs"
            )
    reasons = "; ".join(entry["reason"] for entry in summary.skipped[:5])
    detail = f" ({len(summary.skipped)} inputs skipped: {reasons})" if summary.skipped else ""
    if not sum(summary.samples.values()):
        raise ImportFailedError(f"{source}: no sample could be produced{detail}")
    if not summary.samples["training"]:
        raise ImportFailedError(
            f"{source}: the training split is empty (too few patients for the split fractions?){detail}"
        )
    writer.write_text(SUMMARY_FILENAME, json.dumps(summary.to_dict(), indent=2) + "\n")


# -- image helpers --------------------------------------------------------------------------------
def image_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    """``--size H W`` as an ``(H, W)`` tuple; None (or empty): keep each source's size."""
    if not size:
        return None
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {tuple(size)}")
    return int(size[0]), int(size[1])


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a C x H x W image to C x size[0] x size[1] (linear, anti-aliased when shrinking)."""
    image = np.asarray(image, dtype=np.float32)
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return resize(image, (image.shape[0], *size), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def resize_masks(masks: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize R x H x W binary masks to R x size[0] x size[1].

    Each mask is interpolated linearly as a float and thresholded at 0.5, which keeps shapes
    smoother than nearest-neighbour sampling and keeps the area approximately.
    """
    masks = np.asarray(masks)
    if tuple(masks.shape[1:]) == tuple(size):
        return (masks > 0).astype(np.uint8)
    resized = resize((masks > 0).astype(np.float32), (masks.shape[0], *size), order=1, anti_aliasing=False)
    return (resized >= 0.5).astype(np.uint8)


def normalise_minmax(
    image: np.ndarray, lower_percentile: float = 0.0, upper_percentile: float = 100.0, mask: np.ndarray | None = None
) -> np.ndarray:
    """Map intensities to [0, 1]: clip to the given percentiles (of ``mask`` voxels, if given), rescale.

    A constant image becomes all zeros.
    """
    image = np.asarray(image, dtype=np.float32)
    values = image[mask] if mask is not None else image
    if values.size == 0:
        return np.zeros_like(image)
    low, high = np.percentile(values, (lower_percentile, upper_percentile))
    if high <= low:
        return np.zeros_like(image)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def check_binary_mask(mask: np.ndarray, source: str) -> np.ndarray:
    """A stored rater mask -> uint8 {0, 1}; anything not clearly binary is an error.

    Accepted: boolean masks, masks holding only 0 and 1 (any dtype), and masks holding only 0 and
    255 (8-bit exports). Everything else - soft values (0 / 0.5), a stray 255 in a 0/1 mask, NaN -
    would have to be guessed at, so it raises instead (no importer here reads a format that
    documents soft masks).

    Args:
        mask: the mask as stored, any shape (e.g. H x W, or C x H x W for an RGB mask).
        source: the file (and entry) it came from, named in the message.

    Returns:
        uint8 array of the same shape with values in {0, 1}.

    Raises:
        InputError: naming ``source`` and the values found.
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if mask.dtype.kind not in "biuf":
        raise InputError(f"{source}: mask has data type {mask.dtype}, expected numbers 0/1 (or 0/255)")
    if mask.dtype.kind == "f":
        bad = int(np.count_nonzero(np.isnan(mask)))
        if bad:
            raise InputError(f"{source}: mask contains {bad} NaN value(s); a mask must hold 0/1 (or 0/255)")
    # two vectorised passes instead of np.unique: masks can be whole volumes
    zero = mask == 0
    if np.all(zero | (mask == 1)):
        return (~zero).astype(np.uint8)
    if np.all(zero | (mask == 255)):
        return (~zero).astype(np.uint8)
    values = np.unique(mask)
    shown = ", ".join(f"{v:g}" for v in values[:6])
    shown += f", ... ({values.size} distinct values)" if values.size > 6 else ""
    raise InputError(
        f"{source}: mask is not binary (values {shown}); expected 0/1, 0/255 or true/false: "
        "export the masks as binary (threshold soft masks yourself), or remove the file from the input"
    )


def check_finite(array: np.ndarray, source: str, what: str = "image") -> None:
    """Refuse NaN or infinite values in an image or volume; ``source`` names the file.

    Raises:
        InputError: ``"<source>: image contains N NaN or infinite value(s) ..."``.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return  # integers are always finite
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(
            f"{source}: {what} contains {bad} NaN or infinite value(s); fix the file or remove it from the input"
        )
