"""Checkpoint handlers: atomic checkpoint files, exact resume from the newest valid epoch checkpoint.

Training writes an epoch checkpoint ``checkpoint_epoch=N.pt`` with :class:`ResumableCheckpointer`
(network, optimiser, LR scheduler, EMA model, trainer state, plus the random-number states, the AMP
``GradScaler`` and the validation's best-model record) and the best model ``model.pt`` with
:class:`AtomicCheckpointSaver` in the validation handlers. Every file is written atomically
(:func:`atomic_save`): a kill while a file is written leaves the previous file as it was.

When training starts, :class:`ResumableCheckpointer` restores the newest checkpoint that can be read
(an unreadable one is skipped with a warning naming it), so re-running an interrupted training
continues it; on CPU the resumed run ends with the same weights as an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver, ValidationHandler
from monai.transforms import Compose, Randomizable, Transform

__all__ = [
    "atomic_save",
    "latest_checkpoint",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "ResumableCheckpointer",
    "RequiredCheckpointLoader",
]

_EPOCH_PATTERN = re.compile(r"epoch=(\d+)\.pt$")
# temporary files of atomic_save: hidden, so no checkpoint glob ("checkpoint*", "*.pt") ever matches one
_TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
RESUME_KEY = "resume_state"  # checkpoint entry with everything beyond the state dicts (RNG, scaler, validation)
_FORMAT = 1


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial ``path``.

    The object is written to a hidden temporary file in the same folder, flushed to disk, then
    renamed over ``path`` (``os.replace``, atomic on POSIX and Windows): until the rename, an
    existing ``path`` stays as it was; a kill during the write leaves at most the temporary file
    (``.<name>.<hex>.tmp``, removed by the next :class:`ResumableCheckpointer` start). The new file
    gets the usual permissions (``0o666`` less the umask), unlike ``tempfile``'s owner-only ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the rename makes it visible
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def latest_checkpoint(checkpoint_dir: str | Path, prefix: str = "checkpoint") -> Path | None:
    """The ``<prefix>*epoch=N.pt`` file with the largest N in ``checkpoint_dir`` (None if there is none).

    Only the name is looked at; :class:`ResumableCheckpointer` also checks that the file can be read.
    """
    candidates = _epoch_files(checkpoint_dir, prefix)
    return candidates[0][1] if candidates else None


def _epoch_files(checkpoint_dir: str | Path, prefix: str) -> list[tuple[int, Path]]:
    """``(N, path)`` of the ``<prefix>*epoch=N.pt`` files, newest (largest N) first."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob(f"{prefix}*epoch=*.pt"):
        match = _EPOCH_PATTERN.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: (-item[0], item[1].name))


def _read_checkpoint(path: Path, map_location=None) -> Mapping:
    """``torch.load`` (``weights_only=True``) of a checkpoint dictionary; ValueError when it cannot be read.

    A truncated file fails in the zip reader (RuntimeError or OSError), an empty one with EOFError,
    other damage with an unpickling error; all mean the same here: this file cannot be used.
    """
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, ValueError, OSError, AttributeError, IndexError) as error:
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path} ({size} bytes) cannot be read ({_brief(error)})") from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def _brief(error: BaseException) -> str:
    """``"Type: first sentence"`` of an error (torch's zip-reader messages run over several sentences)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 100 and ". " in text:
        text = text.split(". ")[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------
# atomic best-model / interval checkpoints (MONAI CheckpointSaver with an atomic disk saver)


class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that writes with :func:`atomic_save` and deletes replaced files only afterwards.

    Ignite's ``Checkpoint`` removes the file it replaces *before* it saves the new one; here a removal
    is deferred until the next save has completed, and a fixed ``filename`` (e.g. ``model.pt``) is
    never removed at all: ``os.replace`` swaps it for the new file once that file is complete.

    Args:
        dirname: folder of the files (created when missing).
        filename: fixed file name used for every save (MONAI's ``key_metric_filename``), or None to
            use ignite's generated names.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False)
        self.filename = filename
        self._replaced: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        name = self.filename or filename
        atomic_save(checkpoint, self.dirname / name)
        replaced, self._replaced = self._replaced, []
        for old in replaced:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        if self.filename is None:  # a fixed name is replaced in place by the next save
            self._replaced.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files (best model, final, interval) are written atomically.

    Same arguments and file names as ``monai.handlers.CheckpointSaver``; only the writing differs
    (see :class:`AtomicDiskSaver`): MONAI's saver writes in place (``atomic=False``) after removing
    the previous file, so a kill during the write of ``model.pt`` lost the best model.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename=fixed)

    def metrics_completed(self, engine: Engine) -> None:
        # ignite records the new best before it writes it: forget that record when the write fails,
        # so the best-model record (saved in epoch checkpoints) never names a model that is not on disk
        checkpoint = self._key_metric_checkpoint
        record = list(checkpoint._saved) if checkpoint is not None else None
        try:
            super().metrics_completed(engine)
        except BaseException:
            if checkpoint is not None and record is not None:
                checkpoint._saved = record
            raise


# ----------------------------------------------------------------------------------------------------------
# random-number states


def _numpy_state(generator: np.random.RandomState | None = None) -> dict:
    """A ``RandomState``'s state (the global one when None) as ``weights_only``-loadable values."""
    source = np.random if generator is None else generator
    name, keys, position, has_gauss, cached = source.get_state(legacy=True)
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_tuple(state: Mapping) -> tuple:
    keys = np.asarray(state["keys"].cpu().numpy(), dtype=np.uint32)
    return state["name"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"])


def _random_transforms(engine: Engine) -> list[Randomizable]:
    """The randomised transforms of the trainer's training data, in a fixed (config) order.

    With ``num_workers=0`` these transforms run in this process and keep their own NumPy
    ``RandomState`` (``.R``), seeded once when the DataLoader is built: their states must be saved
    for an exact resume. (Worker processes re-seed them from the global torch RNG at every epoch.)
    """
    loader = getattr(engine, "data_loader", None) or getattr(engine.state, "dataloader", None)
    root = getattr(getattr(loader, "dataset", None), "transform", None)
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 6:
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
            return
        if not isinstance(obj, (Randomizable, Transform)):
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable) and isinstance(getattr(obj, "R", None), np.random.RandomState):
            found.append(obj)
        if isinstance(obj, Compose):
            visit(obj.transforms, depth + 1)
        # dictionary transforms often wrap an array transform with its own RandomState
        for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
            if isinstance(value, (Randomizable, Transform)) or (
                isinstance(value, (list, tuple)) and any(isinstance(v, (Randomizable, Transform)) for v in value)
            ):
                visit(value, depth + 1)

    visit(root, 0)
    return found


def _capture_rng(engine: Engine) -> dict:
    """Every random-number state a resumed epoch draws from: torch (CPU and CUDA), NumPy, Python, the
    DataLoader's generator and the training transforms' own states."""
    loader = getattr(engine, "data_loader", None) or getattr(engine.state, "dataloader", None)
    generator = getattr(loader, "generator", None)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": _numpy_state(),
        "python": random.getstate(),
        "dataloader_generator": generator.get_state() if isinstance(generator, torch.Generator) else None,
        "transforms": [_numpy_state(t.R) for t in _random_transforms(engine)],
    }


def _restore_rng(state: Mapping, engine: Engine, logger: logging.Logger, source: Path | None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    # the legacy global RNG is what MONAI transforms and user code draw from: restore it as saved
    np.random.set_state(_numpy_tuple(state["numpy"]))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    loader = getattr(engine, "data_loader", None) or getattr(engine.state, "dataloader", None)
    generator = getattr(loader, "generator", None)
    if state.get("dataloader_generator") is not None and isinstance(generator, torch.Generator):
        generator.set_state(state["dataloader_generator"].cpu())
    transforms = _random_transforms(engine)
    saved = list(state.get("transforms") or [])
    if len(saved) == len(transforms):
        for transform, transform_state in zip(transforms, saved, strict=True):
            transform.R.set_state(_numpy_tuple(transform_state))
    else:
        logger.warning(
            f"{source or 'the checkpoint'} holds the random states of {len(saved)} training transform(s), "
            f"but this run has {len(transforms)}: their states are not restored, so the resumed run will not repeat an "
            "uninterrupted one exactly (was the training preprocessing changed?)"
        )


# ----------------------------------------------------------------------------------------------------------
# validation (evaluators reached through the trainer's ValidationHandlers) and its best-model savers


def _unwrap(handler: Any) -> Any:
    # ignite wraps filtered handlers (Events.X(every=n)) with functools.wraps: __wrapped__ is the handler
    while hasattr(handler, "__wrapped__"):
        handler = handler.__wrapped__
    return getattr(handler, "__self__", handler)


def _validators(engine: Engine) -> list:
    """The evaluators that the trainer's ``ValidationHandler`` s run, in attachment order."""
    found, seen = [], set()
    for handlers in engine._event_handlers.values():
        for handler, _, _ in handlers:
            owner = _unwrap(handler)
            if isinstance(owner, ValidationHandler) and owner.validator is not None and id(owner) not in seen:
                seen.add(id(owner))
                found.append((owner, owner.validator))
    return found


def _key_metric_savers(evaluator: Engine) -> list[CheckpointSaver]:
    """The evaluator's ``CheckpointSaver`` s that keep a best model (``save_key_metric=True``)."""
    found, seen = [], set()
    for handlers in evaluator._event_handlers.values():
        for handler, _, _ in handlers:
            owner = _unwrap(handler)
            if isinstance(owner, CheckpointSaver) and owner._key_metric_checkpoint is not None:
                if id(owner) not in seen:
                    seen.add(id(owner))
                    found.append(owner)
    return found


def _best_checkpoint(saver: CheckpointSaver) -> Checkpoint:
    """The saver's best-model ``Checkpoint`` (:func:`_key_metric_savers` keeps only savers that have one)."""
    checkpoint = saver._key_metric_checkpoint
    if checkpoint is None:
        raise ValueError("a CheckpointSaver without save_key_metric keeps no best model")
    return checkpoint


def _best_files(saver: CheckpointSaver) -> list[Path]:
    """The files that hold the saver's recorded best models."""
    checkpoint = _best_checkpoint(saver)
    fixed = getattr(checkpoint.save_handler, "filename", None)
    directory = Path(saver.save_dir)
    if fixed is not None:
        return [directory / fixed] if checkpoint._saved else []
    return [directory / item.filename for item in checkpoint._saved]


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------------------
# hyperparameters that a checkpoint fixes

# param_group entries that are implementation switches, not training settings
_NOT_HYPERPARAMETERS = {"params", "foreach", "capturable", "differentiable", "fused", "maximize"}
# LR-scheduler state entries that are progress, not settings (base_lrs/_last_lr follow the optimiser's lr)
_SCHEDULER_PROGRESS = {"last_epoch", "_step_count", "_get_lr_called_within_step", "_last_lr", "_is_initial", "base_lrs"}


def _settings(obj: Any) -> dict[str, Any]:
    """The settings of an optimiser (per param group) or LR scheduler that loading its state replaces."""
    flat: dict[str, Any] = {}
    if isinstance(obj, torch.optim.Optimizer):
        for index, group in enumerate(obj.param_groups):
            prefix = f"param group {index}: " if len(obj.param_groups) > 1 else ""
            for key, value in group.items():
                if key in _NOT_HYPERPARAMETERS or (key == "lr" and "initial_lr" in group):
                    continue  # with a scheduler, 'lr' is progress and 'initial_lr' the setting
                if isinstance(value, (int, float, bool, tuple, list)) or value is None:
                    flat[prefix + ("lr" if key == "initial_lr" else key)] = value
    elif isinstance(obj, torch.optim.lr_scheduler.LRScheduler):

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), item)
            elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
                for index, item in enumerate(value):
                    walk(f"{prefix}[{index}]", item)
            elif isinstance(value, (int, float, bool, str, tuple, list)) or value is None:
                flat[prefix] = value

        walk("", {k: v for k, v in obj.state_dict().items() if k not in _SCHEDULER_PROGRESS})
    return flat


class ResumableCheckpointer:
    """Save an epoch checkpoint after every epoch and, at start, resume from the newest valid one.

    The trainer itself is added to the checkpoint (under ``engine_key``) when the handler is
    attached, so the config does not have to reference the trainer inside the trainer's own
    handler list (a circular reference). A checkpoint ``checkpoint_epoch=N.pt`` holds the state dicts
    of ``save_dict`` and the trainer (epoch, iteration), and under ``"resume_state"``: the random-number
    states (torch CPU/CUDA, NumPy, Python, the DataLoader generator, the training transforms' own
    states), the AMP ``GradScaler`` and, for each evaluator run by a ``ValidationHandler``, its best
    metric and its best-model savers' records. Files load with ``torch.load(..., weights_only=True)``.

    Saving: the checkpoint of epoch N is written after every other end-of-epoch handler (validation,
    LR scheduling, logging), atomically (:func:`atomic_save`); the ``keep_last`` newest ones are kept.
    A kill during the validation of epoch N therefore leaves epoch N-1 as the newest checkpoint, and
    the re-run repeats epoch N and its validation.

    Resuming (``Events.STARTED``): the newest checkpoint that can be read is loaded (unreadable ones,
    e.g. truncated or empty, are skipped with a warning naming them); a warning names every optimiser
    or scheduler setting (e.g. the learning rate) that this run configures differently from the
    checkpoint, whose value wins; a recorded best model (``model.pt``) that is missing or unreadable is
    reported and rebuilt by validating the resumed weights at once. The random states are restored
    when the next epoch starts, so an interrupted run ends, on CPU, with the same weights as an
    uninterrupted one. A finished training (checkpoint epoch = ``max_epochs``) completes at once.

    Args:
        checkpoint_dir: folder of the epoch checkpoints.
        save_dict: objects to save and restore, e.g. ``{"network", "ema", "optimizer", "lr_scheduler"}``.
        resume: restore from the newest valid checkpoint at ``Events.STARTED`` (when one exists).
        save: write the checkpoints (set False on distributed ranks other than 0; every rank resumes).
        map_location: passed to ``torch.load`` (e.g. the training device).
        engine_key: key of the trainer's state in the checkpoint.
        keep_last: how many epoch checkpoints to keep (the newest; older ones, also those left by
            earlier runs in ``checkpoint_dir``, are deleted after each save); None keeps all.
        prefix: file name prefix, ``<prefix>_epoch=N.pt``.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        save_dict: dict,
        resume: bool = True,
        save: bool = True,
        map_location=None,
        engine_key: str = "trainer",
        keep_last: int | None = 2,
        prefix: str = "checkpoint",
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None to keep every checkpoint), got {keep_last}")
        if engine_key in save_dict or RESUME_KEY in save_dict:
            raise ValueError(f"save_dict must not use the reserved keys '{engine_key}' and '{RESUME_KEY}'")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.save = save
        self.map_location = map_location
        self.engine_key = engine_key
        self.keep_last = keep_last
        self.prefix = prefix
        self.loaded_from: Path | None = None
        self.skipped: list[Path] = []  # unreadable checkpoints passed over at the last resume
        self.last_saved: Path | None = None
        self.logger = logging.getLogger(__name__)
        self._objects: dict = {}
        self._pending_rng: Mapping | None = None
        self._pending_rebuild: list = []  # (ValidationHandler, evaluator) to run before the next epoch
        self._resumed_epoch = 0

    def attach(self, engine: Engine) -> None:
        self._objects = {**self.save_dict, self.engine_key: engine}
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._after_resume)
        engine.add_event_handler(Events.COMPLETED, self._after_resume)

    # -- events ---------------------------------------------------------------------------------------

    def _started(self, engine: Engine) -> None:
        if self.save:
            self._remove_temporary_files()
            # registered now, after every handler of the config was attached: the checkpoint is
            # written after validation, LR scheduling and the other end-of-epoch handlers
            if not engine.has_event_handler(self._save, Events.EPOCH_COMPLETED):
                engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)
        if self.resume:
            self._resume(engine)

    def _after_resume(self, engine: Engine) -> None:
        """At the first epoch start (or the completion) after a resume: rebuild a lost best model,
        then restore the random states, just before the epoch draws from them."""
        rebuild, self._pending_rebuild = self._pending_rebuild, []
        for _, evaluator in rebuild:
            self.logger.warning(f"validating the resumed weights of epoch {self._resumed_epoch} for a new best model")
            evaluator.run(self._resumed_epoch)
        if self._pending_rng is not None and engine.last_event_name == Events.EPOCH_STARTED:
            _restore_rng(self._pending_rng, engine, self.logger, self.loaded_from)
        self._pending_rng = None

    def _save(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        checkpoint = {}
        for key, obj in self._objects.items():
            if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
                obj = obj.module
            checkpoint[key] = obj.state_dict()
        checkpoint[RESUME_KEY] = self._resume_state(engine)
        path = atomic_save(checkpoint, self.checkpoint_dir / f"{self.prefix}_epoch={epoch}.pt")
        self.last_saved = path
        self.logger.debug(f"saved checkpoint {path}")  # the epoch line and the summary name the folder
        self._prune(epoch)

    # -- saving ---------------------------------------------------------------------------------------

    def _resume_state(self, engine: Engine) -> dict:
        scaler = getattr(engine, "scaler", None)
        validation = []
        for _, evaluator in _validators(engine):
            validation.append(
                {
                    "best_metric": _scalar(getattr(evaluator.state, "best_metric", -1)),
                    "best_metric_epoch": int(getattr(evaluator.state, "best_metric_epoch", -1)),
                    "savers": [
                        [(_scalar(item.priority), item.filename) for item in _best_checkpoint(saver)._saved]
                        for saver in _key_metric_savers(evaluator)
                    ],
                }
            )
        return {
            "format": _FORMAT,
            "rng": _capture_rng(engine),
            "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "validation": validation,
        }

    def _prune(self, epoch: int) -> None:
        """Delete all but the ``keep_last`` newest ``<prefix>_epoch=N.pt`` with N <= ``epoch``."""
        if self.keep_last is None:
            return
        pattern = re.compile(rf"^{re.escape(self.prefix)}_epoch=(\d+)\.pt$")
        older = []
        for path in self.checkpoint_dir.glob(f"{self.prefix}_epoch=*.pt"):
            match = pattern.match(path.name)
            if match and int(match.group(1)) <= epoch:
                older.append((int(match.group(1)), path))
        for _, path in sorted(older, reverse=True)[self.keep_last :]:
            path.unlink(missing_ok=True)
            self.logger.debug(f"removed old checkpoint {path} (keep_last={self.keep_last})")

    def _remove_temporary_files(self) -> None:
        """Remove the temporary files of writes that a kill interrupted (see :func:`atomic_save`)."""
        if not self.checkpoint_dir.is_dir():
            return
        for path in self.checkpoint_dir.iterdir():
            if _TEMP_PATTERN.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                self.logger.info(f"removed {path}, left by an interrupted checkpoint write")

    # -- resuming -------------------------------------------------------------------------------------

    def _newest_valid(self) -> tuple[Path, Mapping] | None:
        self.skipped = []
        for epoch, path in _epoch_files(self.checkpoint_dir, self.prefix):
            try:
                checkpoint = _read_checkpoint(path, self.map_location)
            except ValueError as error:
                self.skipped.append(path)
                self.logger.warning(
                    f"skipping a checkpoint: {error}; resuming from an older one if there is one "
                    f"(the next save of epoch {epoch} replaces this file)"
                )
                continue
            return path, checkpoint
        return None

    def _resume(self, engine: Engine) -> None:
        found = self._newest_valid()
        if found is None:
            if self.skipped:
                self.logger.warning(
                    f"no readable checkpoint in {self.checkpoint_dir} (skipped: "
                    f"{', '.join(p.name for p in self.skipped)}): training starts from scratch"
                )
            else:
                self.logger.info(f"no checkpoint in {self.checkpoint_dir}: training starts from scratch")
            return
        path, checkpoint = found
        missing = [key for key in self._objects if key not in checkpoint]
        if missing:
            raise ValueError(
                f"checkpoint {path} has no {', '.join(repr(k) for k in missing)} (it has "
                f"{', '.join(repr(k) for k in checkpoint)}): it was written by a differently configured "
                "training; resume it with that configuration, or train anew in another output_dir"
            )
        before = {key: _settings(obj) for key, obj in self.save_dict.items()}
        epoch_length = engine.state.epoch_length
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=self._objects, checkpoint=checkpoint)
        except (RuntimeError, KeyError, ValueError) as error:
            raise RuntimeError(
                f"checkpoint {path} does not fit this run ({error}); it was written by a differently configured "
                "training: resume it with that configuration, or train anew in another output_dir"
            ) from error
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"checkpoint {path} is at epoch {engine.state.epoch}, beyond this run's "
                f"max_epochs={prior_max_epochs}: set max_epochs to at least {engine.state.epoch} to continue"
            )
        engine.state.max_epochs = prior_max_epochs
        self.loaded_from = path
        self._resumed_epoch = engine.state.epoch
        self._warn_changed_settings(path, before, epoch_length, engine.state.epoch_length)
        self._restore_extra(engine, path, checkpoint.get(RESUME_KEY))
        self.logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    def _warn_changed_settings(self, path: Path, before: dict, old_length, new_length) -> None:
        for key, obj in self.save_dict.items():
            after = _settings(obj)  # now the checkpoint's values
            for name, configured in before[key].items():
                if name in after and after[name] != configured:
                    self.logger.warning(
                        f"'{key}' {name}: this run configures {configured!r}, but checkpoint {path} has "
                        f"{after[name]!r}, and the checkpoint's value is used (resuming continues the saved "
                        f"{key}); to train with {configured!r}, start a new training in another output_dir"
                    )
        if old_length is not None and new_length is not None and old_length != new_length:
            self.logger.warning(
                f"iterations per epoch: this run's data gives {old_length}, but checkpoint {path} has "
                f"{new_length} (batch_size or the dataset changed); the checkpoint's epoch length is used"
            )

    def _restore_extra(self, engine: Engine, path: Path, state: Mapping | None) -> None:
        if not state:
            self.logger.warning(
                f"checkpoint {path} has no random-number states or validation record (written by an older "
                "version): the resumed run does not repeat an uninterrupted one exactly, and the next "
                "validation replaces the best model whatever its score"
            )
            return
        self._pending_rng = state.get("rng")
        scaler, scaler_state = getattr(engine, "scaler", None), state.get("grad_scaler")
        if scaler_state and scaler is not None and scaler.is_enabled():
            scaler.load_state_dict(scaler_state)
        elif scaler_state:
            self.logger.warning(
                f"checkpoint {path} holds a GradScaler state, but this run does not use AMP: the state is ignored"
            )
        validators = _validators(engine)
        records = list(state.get("validation") or [])
        if len(records) != len(validators):
            self.logger.warning(
                f"checkpoint {path} records {len(records)} validation(s), this run has {len(validators)}: the "
                "best-model records are not restored, so the next validation replaces the best model whatever "
                "its score"
            )
            return
        for (handler, evaluator), record in zip(validators, records, strict=True):
            self._restore_validation(path, handler, evaluator, record)

    def _restore_validation(self, path: Path, handler, evaluator: Engine, record: Mapping) -> None:
        evaluator.state.best_metric = record["best_metric"]
        evaluator.state.best_metric_epoch = record["best_metric_epoch"]
        savers = _key_metric_savers(evaluator)
        lost: list[str] = []
        if len(savers) == len(record["savers"]):
            for saver, saved in zip(savers, record["savers"], strict=True):
                _best_checkpoint(saver).load_state_dict({"_saved": [tuple(item) for item in saved]})
                lost += _unreadable(_best_files(saver))
        elif savers:  # ranks other than 0 have no savers (disabled in the configs): nothing to restore there
            self.logger.warning(f"checkpoint {path}: its best-model savers differ from this run's; not restored")
        rebuild = bool(lost)
        if idist.get_world_size() > 1:  # the ranks validate together: rank 0, which has the savers, decides
            rebuild = bool(idist.broadcast(torch.tensor([int(rebuild)]), src=0).item())
        if lost:
            metric = getattr(evaluator.state, "key_metric_name", None) or "key metric"
            value = record["best_metric"]
            value = f"{value:.4g}" if isinstance(value, float) else value
            self.logger.warning(
                f"best model lost: {'; '.join(lost)}. Checkpoint {path} records the best {metric} "
                f"{value} from epoch {record['best_metric_epoch']}; those weights cannot be "
                f"recovered. The resumed weights of epoch {self._resumed_epoch} are validated now to write a new "
                "best model, which later validations replace when they do better"
            )
        if rebuild:
            for saver in savers:
                _best_checkpoint(saver)._saved = []
            evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1
            self._pending_rebuild.append((handler, evaluator))


def _unreadable(paths: list[Path]) -> list[str]:
    """What is wrong with each of ``paths`` that is missing or cannot be read."""
    problems = []
    for path in paths:
        if not path.exists():
            problems.append(f"{path} is missing")
            continue
        try:
            _read_checkpoint(path, "cpu")
        except ValueError as error:
            problems.append(str(error))
    return problems


class RequiredCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that fails with a clear message when the file is missing or unreadable."""

    def __init__(self, load_path: str, load_dict: dict, **kwargs) -> None:
        if not Path(load_path).is_file():
            raise FileNotFoundError(
                f"checkpoint '{load_path}' does not exist: train the bundle first "
                "(python -m monai.bundle run training --config_file <bundle>/configs/train.json) "
                "or pass --ckpt_path to an existing checkpoint."
            )
        super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except Exception as error:
            # a damaged file fails inside torch.load with EOFError, OSError, RuntimeError or an unpickling
            # error: read it once more (only on failure) to tell damage from a checkpoint that does not fit
            try:
                _read_checkpoint(Path(self.load_path), "cpu")
            except ValueError as damage:
                raise ValueError(
                    f"checkpoint {damage}: it is damaged (e.g. truncated); re-run the training that wrote it "
                    "(it resumes and rebuilds the best model) or pass --ckpt_path to another checkpoint"
                ) from error
            raise
