"""PNG grids of image / raters / samples / mean / variance, written to disk and logged to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from ambiseg_monai.handlers.metrics import as_batch, batch_field
from ambiseg_monai.handlers.mlflow_logging import log_artifact

__all__ = ["render_sample_grid", "SampleGridHandler"]

logger = logging.getLogger(__name__)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x).detach().float().cpu().numpy()


def render_sample_grid(
    images: np.ndarray,
    raters: np.ndarray | None,
    samples: np.ndarray,
    path: str | Path,
    rater_mask: np.ndarray | None = None,
    case_ids=None,
    title: str | None = None,
) -> Path:
    """Save one row per image: image | raters | samples | mean | variance.

    Args:
        images: B x C x H x W (the first channel is shown).
        raters: B x M x H x W binary rater masks, or None.
        samples: B x N x H x W binary samples.
        path: output PNG path.
        rater_mask: B x M bool (padding raters are not drawn), or None.
        case_ids: B labels for the rows.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    batch, num_samples = samples.shape[:2]
    rater_stack = raters if raters is not None else np.zeros((batch, 0, *samples.shape[2:]), dtype=samples.dtype)
    num_raters = rater_stack.shape[1]
    columns = 1 + num_raters + num_samples + 2
    fig, axes = plt.subplots(batch, columns, figsize=(1.3 * columns, 1.4 * batch + 0.4), squeeze=False)
    mean = samples.mean(axis=1)
    variance = samples.var(axis=1)
    for b in range(batch):
        # (array, column title, colour map, value limits or None)
        panels: list[tuple[np.ndarray, str, str, tuple[float, float] | None]] = [(images[b, 0], "image", "gray", None)]
        for m in range(num_raters):
            real = rater_mask is None or bool(rater_mask[b, m])
            rater = rater_stack[b, m] if real else np.zeros_like(rater_stack[b, m])
            panels.append((rater, f"rater {m + 1}" if real else "-", "gray", (0, 1)))
        panels += [(samples[b, n], f"sample {n + 1}", "gray", (0, 1)) for n in range(num_samples)]
        panels += [(mean[b], "mean", "viridis", (0, 1)), (variance[b], "variance", "magma", (0, 0.25))]
        for ax, (panel, label, cmap, limits) in zip(axes[b], panels, strict=True):
            vmin, vmax = limits if limits is not None else (None, None)
            ax.imshow(panel, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(label, fontsize=7)
        if case_ids is not None:
            axes[b, 0].set_ylabel(str(case_ids[b]), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating the folder) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


class SampleGridHandler:
    """After the first iteration of each evaluator run, render the batch as a PNG grid.

    Reads ``image``, ``label`` and ``pred`` (B x N x H x W samples) from the non-decollated
    ``engine.state.output`` or a decollated list, and ``rater_mask``/``case_id`` from
    ``engine.state.batch``. Writes ``<output_dir>/<prefix>_epoch<E>.png`` (E = ``engine.state.epoch``,
    the trainer's epoch for a validator) and logs it to the MLflow run of ``mlflow_handler`` (if given).

    Args:
        output_dir: folder of the PNG files.
        mlflow_handler: a MONAI ``MLFlowHandler`` attached to the same engine, or None.
        max_images: most images (rows) per grid.
        prefix: file-name prefix.
        artifact_path: MLflow artifact folder.
    """

    def __init__(
        self,
        output_dir: str | Path,
        mlflow_handler=None,
        max_images: int = 4,
        prefix: str = "samples",
        artifact_path: str = "samples",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.max_images = int(max_images)
        self.prefix = prefix
        self.artifact_path = artifact_path
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
        path = self.output_dir / f"{self.prefix}_epoch{engine.state.epoch:04d}.png"
        render_sample_grid(
            _numpy(images)[:k],
            None if raters is None else _numpy(raters)[:k],
            _numpy(samples)[:k],
            path,
            rater_mask=None if rater_mask is None else _numpy(rater_mask)[:k] > 0,
            case_ids=None if case_ids is None else list(case_ids)[:k],
            title=f"epoch {engine.state.epoch}",
        )
        self.written.append(path)
        if self.mlflow_handler is not None:
            log_artifact(self.mlflow_handler, path, self.artifact_path)
