"""What a run prints: one line per epoch, a progress bar, labelled phases, a final summary.

- :class:`EpochLossLogger`: one line per epoch with the epoch's mean loss terms and its time, and a tqdm
  progress bar over the epoch's iterations with the running loss (only when stderr is a terminal: logs and
  captured output get the epoch line alone). MONAI's ``StatsHandler`` prints per-iteration lines on request
  (the bundles' ``log_every_iteration``).
- :class:`PhaseLogger`: names a validation or evaluation phase when it starts: which split, how many images
  and how many samples per image; for an evaluation (``metrics=True``), its metrics when it ends, in place of
  MONAI's ``StatsHandler`` lines (``Epoch[1] Metrics``, ``Key metric: ... best value ... at epoch: 1``: an
  evaluator's epoch and "best" value say nothing).
- :class:`TrainingSummary`: at the end of a training, where the checkpoints and samples went, the best
  metric, the MLflow run id and the ``mlflow ui`` command; on the re-run of a finished training, that it is
  finished (nothing was trained, nothing logged).
- :class:`RunSummary`: at the end of an evaluation or an inference, how many images, the folder its tables,
  sample images and NIfTI files went to, and for an evaluation the MLflow run id and the ``mlflow ui``
  command.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

__all__ = [
    "EpochLossLogger",
    "PhaseLogger",
    "RunSummary",
    "format_metrics",
    "TrainingSummary",
    "training_already_finished",
    "mlflow_ui_command",
]

logger = logging.getLogger("ambiseg")


def training_already_finished(engine: Engine) -> bool:
    """True at ``Events.STARTED`` of a trainer resumed from a checkpoint of its last epoch (nothing to run)."""
    max_epochs = engine.state.max_epochs
    return max_epochs is not None and engine.state.iteration > 0 and engine.state.epoch >= max_epochs


def mlflow_ui_command(tracking_uri: str | None) -> str:
    """The command that browses a tracking store (``mlflow ui --backend-store-uri sqlite:///mlruns.db``)."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri else "mlflow ui"


def _mlflow_run_line(mlflow_handler: Any | None, run_id: str | None, tracking_uri: str | None) -> str | None:
    """The summary's ``  MLflow run:  <id> (mlflow ui ...)`` line, or None without a run."""
    if run_id is None:
        run = getattr(mlflow_handler, "cur_run", None)
        run_id = None if run is None else run.info.run_id
    run_id = run_id or getattr(mlflow_handler, "recorded_run_id", None)
    return f"  MLflow run:  {run_id} ({mlflow_ui_command(tracking_uri)})" if run_id else None


def _dataset_size(engine: Engine) -> int | None:
    dataset = getattr(engine.state.dataloader, "dataset", None)
    return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None


def _format_terms(terms: Mapping[str, float]) -> str:
    main = terms.get("loss")
    rest = ", ".join(f"{k} {v:.4g}" for k, v in sorted(terms.items()) if k != "loss")
    if main is None:
        return rest
    return f"loss {main:.4f}" + (f" ({rest})" if rest else "")


class EpochLossLogger:
    """One line per epoch with the mean of each loss term, and a progress bar over the epoch's iterations.

    Args:
        output_transform: engine output -> ``{term: value}`` (a bundle's ``LossTerms``) or a number.
        progress_bar: show a tqdm bar (ignite's ``ProgressBar``); None: only when stderr is a terminal.
        name: logger name.
    """

    def __init__(
        self,
        output_transform: Callable[[Any], Any] = lambda output: output,
        progress_bar: bool | None = None,
        name: str = "ambiseg",
    ) -> None:
        self.output_transform = output_transform
        self.progress_bar = sys.stderr.isatty() if progress_bar is None else bool(progress_bar)
        self.logger = logging.getLogger(name)
        self._sums: dict[str, float] = {}
        self._count = 0
        self._started = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.progress_bar:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False, desc="training").attach(
                engine, output_transform=lambda output: self._terms_from_output(output).get("loss", 0.0)
            )

    def _terms_from_output(self, output: Any) -> dict[str, float]:
        value = self.output_transform(output)
        if isinstance(value, Mapping):
            return {str(k): float(v) for k, v in value.items()}
        return {"loss": float(value)}

    def _epoch_started(self, engine: Engine) -> None:
        self._sums, self._count, self._started = {}, 0, time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        for key, value in self._terms_from_output(engine.state.output).items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        means = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        seconds = time.perf_counter() - self._started
        self.logger.info(
            f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {_format_terms(means)} "
            f"[{self._count} iterations, {seconds:.1f} s]"
        )


def _scalar(value: Any) -> float | None:
    """``value`` as a float when it is one number (a Python number, a one-element tensor or array), else None."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # a dict, a list, a tensor of several values
        return None


def format_metrics(metrics: Mapping[str, Any], first: str | None = None) -> str:
    """``ged 1.1324, ci 0.1612, dmax 0.1794, ...``: ``first`` (the key metric) first, then by name; values that
    are not one number are left out."""
    values = {str(k): v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
    order = ([first] if first in values else []) + sorted(k for k in values if k != first)
    return ", ".join(f"{k} {values[k]:.4f}" for k in order)


class PhaseLogger:
    """Name a validation or evaluation phase when its engine starts; with ``metrics``, report its metrics
    when it ends.

    ``validation after epoch 10 (N = 4 samples per image, 16 images of split 'validation')``,
    ``evaluation (N = 16 samples per image, 16 images of split 'test')``, and at the end of the evaluation
    ``results of evaluation (N = 16 samples per image, 16 images of split 'test'): ged 0.2513, ci 0.7011,
    ... [12.3 s]`` (the key metric first).

    Args:
        label: the phase (``validation``, ``evaluation``, ``inference``).
        num_samples: samples per image (None: not said).
        split: the dataset split the images come from (None: not said).
        metrics: log ``engine.state.metrics`` when the engine completes (a stand-alone evaluation, whose
            config has no ``StatsHandler`` epoch lines); validation during training leaves them to
            ``StatsHandler``.
        name: logger name.
    """

    def __init__(
        self,
        label: str,
        num_samples: int | None = None,
        split: str | None = None,
        metrics: bool = False,
        name: str = "ambiseg",
    ):
        self.label = label
        self.num_samples = num_samples
        self.split = split
        self.metrics = bool(metrics)
        self.logger = logging.getLogger(name)
        self._started = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        if self.metrics:
            # COMPLETED: after every metric handler's EPOCH_COMPLETED, whatever the order of the handler list
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def _details(self, engine: Engine) -> str:
        size = _dataset_size(engine)
        parts = []
        if self.num_samples is not None:
            parts.append(f"N = {int(self.num_samples)} samples per image")
        if size is not None:
            images = f"{size} images"
            parts.append(images + (f" of split '{self.split}'" if self.split else ""))
        elif self.split:
            parts.append(f"split '{self.split}'")
        return f" ({', '.join(parts)})" if parts else ""

    def __call__(self, engine: Engine) -> None:
        self._started = time.perf_counter()
        when = f" after epoch {engine.state.max_epochs}" if self.label == "validation" else ""
        self.logger.info(f"{self.label}{when}{self._details(engine)}")

    def completed(self, engine: Engine) -> None:
        """``results of <label> (<details>): <metrics> [<seconds> s]``."""
        seconds = time.perf_counter() - self._started
        listed = format_metrics(engine.state.metrics, getattr(engine.state, "key_metric_name", None))
        self.logger.info(f"results of {self.label}{self._details(engine)}: {listed or 'no metrics'} [{seconds:.1f} s]")


class TrainingSummary:
    """At the end of a training: where its outputs went, the best metric, the MLflow run and how to browse it.

    On a re-run of a finished training (resumed at its last epoch), says so instead: nothing was trained
    and nothing was logged.

    Args:
        output_dir: the bundle's output folder (checkpoints under ``ckpt_dir``, images under ``samples``).
        ckpt_dir: the checkpoint folder.
        mlflow_handler: the trainer's MLflow handler (its run id), or None.
        tracking_uri: the tracking store (for the ``mlflow ui`` command).
        validator: the evaluator run by validation (its best metric), or None.
        name: logger name.
    """

    def __init__(
        self,
        output_dir: str | Path,
        ckpt_dir: str | Path,
        mlflow_handler: Any | None = None,
        tracking_uri: str | None = None,
        validator: Engine | None = None,
        name: str = "ambiseg",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.ckpt_dir = Path(ckpt_dir)
        self.mlflow_handler = mlflow_handler
        self.tracking_uri = tracking_uri
        self.validator = validator
        self.logger = logging.getLogger(name)
        self.finished_before = False
        self.run_id: str | None = None
        self._start_epoch = 0
        self._started = 0.0

    def attach(self, engine: Engine) -> None:
        # STARTED handlers run in attachment order: the checkpointer (first in the bundles' list) has
        # resumed by the time this one runs
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_started(self, engine: Engine) -> None:
        self.finished_before = training_already_finished(engine)
        self._start_epoch = engine.state.epoch
        self._started = time.perf_counter()
        run = getattr(self.mlflow_handler, "cur_run", None)
        self.run_id = None if run is None else run.info.run_id

    def _on_completed(self, engine: Engine) -> None:
        log = self.logger.info
        if self.finished_before:
            log(
                f"training already finished: the checkpoint in {self.ckpt_dir} is at epoch {engine.state.epoch} "
                f"of max_epochs={engine.state.max_epochs}; nothing trained, nothing logged "
                f"(raise --max_epochs to train longer, or set another --output_dir to train anew)"
            )
        else:
            minutes, seconds = divmod(int(time.perf_counter() - self._started), 60)
            ran = engine.state.epoch - self._start_epoch
            resumed = f", resumed at epoch {self._start_epoch}" if self._start_epoch else ""
            log(
                f"training finished: epoch {engine.state.epoch}/{engine.state.max_epochs} "
                f"({ran} epochs in {minutes} min {seconds} s{resumed})"
            )
        checkpoints = sorted(p.name for p in self.ckpt_dir.glob("*.pt")) if self.ckpt_dir.is_dir() else []
        log(f"  checkpoints: {self.ckpt_dir} ({', '.join(checkpoints) or 'none'})")
        samples = self.output_dir / "samples"
        if samples.is_dir():
            log(f"  samples:     {samples}")
        state = getattr(self.validator, "state", None)
        best, best_epoch = getattr(state, "best_metric", -1), getattr(state, "best_metric_epoch", -1)
        key = getattr(state, "key_metric_name", None) or "key metric"
        if best_epoch is not None and best_epoch > 0:
            log(f"  best {key}:    {float(best):.4f} at epoch {best_epoch} (model.pt)")
        run_line = _mlflow_run_line(self.mlflow_handler, self.run_id, self.tracking_uri)
        if run_line:
            log(run_line)


#: file kinds a :class:`RunSummary` lists: (label, name endings)
_OUTPUT_KINDS = (
    ("tables", (".csv", ".json")),
    ("images", (".png", ".jpg", ".gif")),
    ("NIfTI", (".nii", ".nii.gz")),
)


class RunSummary:
    """At the end of an evaluation or an inference: how many images, where its files went, the MLflow run.

    ::

        evaluation finished: 16 images of split 'test'
          tables:      runs/cimd/eval (n16_per_image.csv, n16_summary.json, n4_per_image.csv, ...)
          images:      runs/cimd/eval (2 files)
          MLflow run:  0123abcd (mlflow ui --backend-store-uri sqlite:///mlruns.db)

    Only the files of ``output_dir`` written since the handler was built (the start of the run) are listed.
    Attach it to the last engine of the run (an evaluation's last phase), last in its handler list.

    Args:
        label: the run (``evaluation``, ``inference``).
        output_dir: the folder the run writes to.
        mlflow_handler: the run's MLflow handler (its run id), or None.
        tracking_uri: the tracking store (for the ``mlflow ui`` command).
        split: the dataset split the images come from (None: not said).
        name: logger name.
    """

    def __init__(
        self,
        label: str,
        output_dir: str | Path,
        mlflow_handler: Any | None = None,
        tracking_uri: str | None = None,
        split: str | None = None,
        name: str = "ambiseg",
    ) -> None:
        self.label = label
        self.output_dir = Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.tracking_uri = tracking_uri
        self.split = split
        self.logger = logging.getLogger(name)
        self._since = time.time() - 2.0  # file systems with coarse modification times

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def _written(self) -> list[Path]:
        if not self.output_dir.is_dir():
            return []
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file() and p.stat().st_mtime >= self._since)

    def __call__(self, engine: Engine) -> None:
        log = self.logger.info
        size = _dataset_size(engine)
        images = "" if size is None else f": {size} images" + (f" of split '{self.split}'" if self.split else "")
        log(f"{self.label} finished{images}")
        written = self._written()
        for kind, endings in _OUTPUT_KINDS:
            files = [p for p in written if p.name.endswith(endings)]
            if not files:
                continue
            if kind == "tables":
                names = ", ".join(str(p.relative_to(self.output_dir)) for p in files[:6])
                listing = f"{names}, ..." if len(files) > 6 else names
            else:
                listing = f"{len(files)} files"
            log(f"  {kind + ':':<12} {self.output_dir} ({listing})")
        if not written:
            log(f"  nothing written to {self.output_dir}")
        run_line = _mlflow_run_line(self.mlflow_handler, None, self.tracking_uri)
        if run_line:
            log(run_line)
