"""PNG grids of image / raters / samples / mean / variance, written to disk and logged to MLflow (once)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.figure import Figure

from ambiseg_monai.handlers.metrics import as_batch, batch_field
from ambiseg_monai.handlers.mlflow_logging import log_artifact

__all__ = [
    "sample_grid_figure",
    "render_sample_grid",
    "log_figure",
    "run_label",
    "phase_caption",
    "figure_stem",
    "SampleGridHandler",
]

logger = logging.getLogger(__name__)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x).detach().float().cpu().numpy()


def sample_grid_figure(
    images: np.ndarray,
    raters: np.ndarray | None,
    samples: np.ndarray,
    rater_mask: np.ndarray | None = None,
    case_ids=None,
    title: str | None = None,
) -> Figure:
    """One row per image: image | raters | samples | mean | variance, colour bars on mean and variance.

    Args:
        images: B x C x H x W (the first channel is shown).
        raters: B x M x H x W binary rater masks, or None.
        samples: B x N x H x W binary samples.
        rater_mask: B x M bool (padding raters are not drawn), or None.
        case_ids: B labels for the rows.
        title: figure title.
    """
    batch, num_samples = samples.shape[:2]
    rater_stack = raters if raters is not None else np.zeros((batch, 0, *samples.shape[2:]), dtype=samples.dtype)
    num_raters = rater_stack.shape[1]
    columns = 1 + num_raters + num_samples + 2
    # mean and variance are wider by their colour bars
    fig = Figure(figsize=(1.3 * columns + 0.8, 1.4 * batch + 0.4))
    axes = fig.subplots(batch, columns, squeeze=False)
    mean = samples.mean(axis=1)
    variance = samples.var(axis=1)
    for b in range(batch):
        # (array, column title, colour map, value limits or None, colour bar)
        panels: list[tuple[np.ndarray, str, str, tuple[float, float] | None, bool]] = [
            (images[b, 0], "image", "gray", None, False)
        ]
        for m in range(num_raters):
            real = rater_mask is None or bool(rater_mask[b, m])
            rater = rater_stack[b, m] if real else np.zeros_like(rater_stack[b, m])
            panels.append((rater, f"rater {m + 1}" if real else "-", "gray", (0, 1), False))
        panels += [(samples[b, n], f"sample {n + 1}", "gray", (0, 1), False) for n in range(num_samples)]
        # binary samples: the mean is a frequency in [0, 1], the variance p(1 - p) at most 0.25
        panels += [(mean[b], "mean", "viridis", (0, 1), True), (variance[b], "variance", "magma", (0, 0.25), True)]
        for ax, (panel, label, cmap, limits, colour_bar) in zip(axes[b], panels, strict=True):
            vmin, vmax = limits if limits is not None else (None, None)
            shown = ax.imshow(panel, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if colour_bar:
                bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
                bar.ax.tick_params(labelsize=5)
            if b == 0:
                ax.set_title(label, fontsize=7)
        if case_ids is not None:
            axes[b, 0].set_ylabel(str(case_ids[b]), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def render_sample_grid(
    images: np.ndarray,
    raters: np.ndarray | None,
    samples: np.ndarray,
    path: str | Path,
    rater_mask: np.ndarray | None = None,
    case_ids=None,
    title: str | None = None,
) -> Path:
    """Write :func:`sample_grid_figure` to the PNG file ``path``; returns the path."""
    return save_figure(sample_grid_figure(images, raters, samples, rater_mask, case_ids, title), path, dpi=100)


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating the folder) and close it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    if fig.canvas.manager is not None:  # made with pyplot, which holds it until closed
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def log_figure(mlflow_handler, path: str | Path, artifact_path: str | None = None) -> bool:
    """Log a figure a handler wrote into the run of ``mlflow_handler``, once.

    MONAI's ``MLFlowHandler`` itself logs every file under its ``artifacts`` folders when its engine
    completes (``evaluate.json``: the evaluation folder, at the artifact root). A figure written there is
    left to it: logging it here too would store it twice. Returns whether it was logged here.
    """
    path = Path(path).resolve()
    for logged in getattr(mlflow_handler, "artifacts", None) or ():
        if logged and (path == Path(logged).resolve() or Path(logged).resolve() in path.parents):
            return False
    return log_artifact(mlflow_handler, path, artifact_path)


def run_label(mlflow_handler) -> str | None:
    """``<experiment> · <run name>`` of the run a MONAI ``MLFlowHandler`` logs to (None before it started):
    the method (experiments are named after bundles) and the run, for figure titles."""
    run = getattr(mlflow_handler, "cur_run", None)
    if run is None:
        return None
    experiment = getattr(mlflow_handler, "experiment_name", None)
    return " · ".join(str(part) for part in (experiment, run.info.run_name) if part)


def phase_caption(phase: str | None, split: str | None, epoch: int, num_samples: int) -> str:
    """What a figure of an evaluator run shows: ``evaluation, test split, N = 16 samples per image`` for a
    stand-alone phase, ``epoch 10, N = 4 samples per image`` for validation during training (``phase=None``:
    the engine's epoch is the trainer's; an evaluator's own epoch, always 1, would say nothing)."""
    when = f"epoch {epoch}" if phase is None else phase + (f", {split} split" if split else "")
    return f"{when}, N = {num_samples} samples per image"


def figure_stem(prefix: str, phase: str | None, epoch: int) -> str:
    """File name (without ``.png``) of a figure of an evaluator run: ``<prefix>_epoch<E>`` during training
    (one per validation), ``<prefix>`` for a stand-alone phase (one per run)."""
    return f"{prefix}_epoch{epoch:04d}" if phase is None else prefix


class SampleGridHandler:
    """After the first iteration of each evaluator run, render the batch as a PNG grid.

    Reads ``image``, ``label`` and ``pred`` (B x N x H x W samples) from the non-decollated
    ``engine.state.output`` or a decollated list, and ``rater_mask``/``case_id`` from
    ``engine.state.batch``. A validator run during training (``phase=None``) writes
    ``<output_dir>/<prefix>_epoch<E>.png`` (E = ``engine.state.epoch``, the trainer's epoch), titled with that
    epoch; a stand-alone phase (``phase="evaluation"``) writes ``<output_dir>/<prefix>.png``, titled with the
    phase and split. The title also names the method and run (from ``mlflow_handler``, or ``name``) and the
    number of samples N. The grid is logged once to the MLflow run of ``mlflow_handler`` (if given; see
    :func:`log_figure`).

    Args:
        output_dir: folder of the PNG files.
        mlflow_handler: a MONAI ``MLFlowHandler`` attached to the same engine, or None.
        max_images: most images (rows) per grid.
        prefix: file-name prefix.
        artifact_path: MLflow artifact folder.
        phase: None for validation during training (the engine's epoch is the trainer's), else the phase's
            name (``"evaluation"``): an evaluator's own epoch (always 1) says nothing.
        split: the datalist split the images come from (``"test"``), shown after the phase.
        name: method / run label of the title; default the experiment and run name of ``mlflow_handler``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        mlflow_handler=None,
        max_images: int = 4,
        prefix: str = "samples",
        artifact_path: str = "samples",
        phase: str | None = None,
        split: str | None = None,
        name: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.max_images = int(max_images)
        self.prefix = prefix
        self.artifact_path = artifact_path
        self.phase = phase
        self.split = split
        self.name = name
        self.written: list[Path] = []
        self._pending = True

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._arm)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _arm(self, engine: Engine) -> None:
        self._pending = True

    @staticmethod
    def _field(container, key):
        """``container[key]`` of a collated batch / output, stacked from a decollated one (strings as a list)."""
        value = batch_field(container, key)
        if isinstance(value, list) and value and not isinstance(value[0], str):
            return as_batch(value, key)
        return value

    def title(self, engine: Engine, num_samples: int) -> str:
        """``cimd · cimd_20260101_120000 — evaluation, test split, N = 16 samples per image`` (validation
        during training: ``... — epoch 10, N = 4 samples per image``)."""
        what = phase_caption(self.phase, self.split, engine.state.epoch, num_samples)
        label = self.name or run_label(self.mlflow_handler)
        return f"{label} — {what}" if label else what

    def __call__(self, engine: Engine) -> None:
        if not self._pending:
            return
        self._pending = False
        output, batch = engine.state.output, engine.state.batch
        samples = self._field(output, "pred")
        images = self._field(output, "image")
        if samples is None or images is None:
            logger.warning("SampleGridHandler: no 'pred'/'image' in the engine output; nothing rendered")
            return
        raters = self._field(output, "label")
        rater_mask = self._field(batch, "rater_mask")
        case_ids = self._field(batch, "case_id")
        k = self.max_images
        name = figure_stem(self.prefix, self.phase, engine.state.epoch)
        path = render_sample_grid(
            _numpy(images)[:k],
            None if raters is None else _numpy(raters)[:k],
            _numpy(samples)[:k],
            self.output_dir / f"{name}.png",
            rater_mask=None if rater_mask is None else _numpy(rater_mask)[:k] > 0,
            case_ids=None if case_ids is None else list(case_ids)[:k],
            title=self.title(engine, int(samples.shape[1])),
        )
        self.written.append(path)
        if self.mlflow_handler is not None:
            log_figure(self.mlflow_handler, path, self.artifact_path)
