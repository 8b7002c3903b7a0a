"""Score an evaluator's samples against a known true rater distribution, and plot the frequencies.

On a dataset whose items carry a ``truth`` (the demo dataset; loaded by
:class:`~ambiseg_monai.transforms.loading.LoadTruthd`), the samples can be judged against the distribution
itself rather than against four rater draws. :class:`TruthMetricsHandler` publishes, averaged over images:

- ``truth_ged``: GED to the true distribution (:func:`~ambiseg_monai.metrics.generalized_energy_distance_to_truth`);
- ``truth_mode_tv``: total variation between the sampled mode frequencies (each sample assigned to the mode
  it overlaps best) and the true probabilities; samples matching no mode count as error;
- ``truth_lobe_error``: mean ``|f_l - p_l|`` over the lobes (regions a rater includes independently), the
  frequency figure that does not depend on the shape quality (when the truth has regions);
- ``truth_empty_error``: ``|sampled empty fraction - true empty probability|``;
- ``isolated_pixels``: the share of foreground pixels without a foreground neighbour (speckle).

At the end of each run it writes a plot of the sampled against the true frequency of every mode of every
image, and per-image bars, and logs it to MLflow: ``<output_dir>/<prefix>_epoch<E>.png`` titled with the
trainer's epoch for validation during training, ``<output_dir>/<prefix>.png`` titled with the phase and split
for a stand-alone phase (``phase="evaluation"``), as the sample grids
(:class:`~ambiseg_monai.handlers.sample_images.SampleGridHandler`). Batches without truth are skipped, so the
handler can stay in a config that also runs on real data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from ambiseg_monai.handlers.sample_images import figure_stem, log_figure, phase_caption, run_label, save_figure
from ambiseg_monai.metrics.speckle import isolated_pixel_fraction
from ambiseg_monai.metrics.truth import truth_scores

__all__ = ["TRUTH_KEYS", "TRUTH_METRIC_NAMES", "TruthMetricsHandler", "render_mode_frequencies"]

logger = logging.getLogger(__name__)

TRUTH_METRIC_NAMES = ("truth_ged", "truth_mode_tv", "truth_lobe_error", "truth_empty_error", "isolated_pixels")
# batch keys written by LoadTruthd (prefix "truth_")
TRUTH_KEYS = ("modes", "mode_mask", "probabilities", "regions", "region_mask", "region_probabilities")


def _tensor(value) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        return torch.stack([torch.as_tensor(v) for v in value])
    return torch.as_tensor(value.as_tensor() if hasattr(value, "as_tensor") else value)


def render_mode_frequencies(
    probabilities: np.ndarray,
    frequencies: np.ndarray,
    mode_mask: np.ndarray,
    num_samples: int,
    path: str | Path,
    case_ids=None,
    max_images: int = 12,
    title: str | None = None,
) -> Path:
    """Sampled against true frequency of every mode: one scatter over all images, then bars per image.

    Args:
        probabilities: B x K true probabilities (0 on padding).
        frequencies: B x K sampled frequencies of the modes.
        mode_mask: B x K bool marking real modes.
        num_samples: N, the samples per image (for the binomial band of the scatter).
        path: output PNG.
        case_ids: B labels; max_images: most per-image panels.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = min(len(probabilities), max_images)
    columns = 4
    rows = 1 + int(np.ceil(shown / columns))
    fig = plt.figure(figsize=(3.0 * columns, 2.3 * rows + 0.3))
    grid = fig.add_gridspec(rows, columns)
    scatter = fig.add_subplot(grid[0, :2])
    p, f = probabilities[mode_mask], frequencies[mode_mask]
    line = np.linspace(0, 1, 101)
    band = 2 * np.sqrt(line * (1 - line) / max(1, num_samples))
    scatter.fill_between(line, line - band, line + band, color="0.85", label=f"±2 s.e. ({num_samples} samples)")
    scatter.plot([0, 1], [0, 1], color="0.4", lw=0.8)
    scatter.scatter(p, f, s=12, alpha=0.7)
    scatter.set(xlim=(0, 1), ylim=(0, 1), xlabel="true probability", ylabel="sampled frequency")
    scatter.set_title("every mode of every image", fontsize=9)
    scatter.legend(fontsize=7, loc="upper left")
    unmatched = fig.add_subplot(grid[0, 2:])
    total_variation = 0.5 * (np.abs(frequencies - probabilities) * mode_mask).sum(1) + 0.5 * (1 - frequencies.sum(1))
    unmatched.bar(np.arange(len(total_variation)), total_variation, color="tab:red")
    unmatched.set(xlabel="image", ylabel="mode TV", ylim=(0, 1))
    unmatched.set_title("total variation per image", fontsize=9)
    for index in range(shown):
        ax = fig.add_subplot(grid[1 + index // columns, index % columns])
        real = np.flatnonzero(mode_mask[index])
        x = np.arange(len(real))
        ax.bar(x - 0.2, probabilities[index, real], width=0.4, label="true", color="0.6")
        ax.bar(x + 0.2, frequencies[index, real], width=0.4, label="sampled", color="tab:blue")
        ax.set(ylim=(0, 1), xticks=x)
        ax.set_xticklabels([str(k) for k in real], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(str(case_ids[index]) if case_ids is not None else f"image {index}", fontsize=8)
        if index == 0:
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=90)


class TruthMetricsHandler:
    """Truth metrics and the mode-frequency plot of an evaluator run (see the module docstring).

    Reads the samples from ``engine.state.output[pred_key]`` (B x N x H x W; a B x C x G x H x W consensus
    sample stack is flattened to C·G samples) and the truth from ``engine.state.batch`` (the keys written by
    :class:`~ambiseg_monai.transforms.loading.LoadTruthd`). Needs a non-decollated output (``decollate=False``).

    Args:
        output_dir: folder of the PNG (None: no plot).
        mlflow_handler: a MONAI ``MLFlowHandler`` of the same engine: the PNG is logged to its run, once
            (:func:`~ambiseg_monai.handlers.sample_images.log_figure`).
        pred_key: output key of the samples (``"samples"`` for consensus diffusion's per-level draws).
        prefix: file-name prefix of the PNG.
        min_coverage: a sample includes a lobe when it covers more than this fraction of it.
        max_images: per-image panels in the plot.
        artifact_path: MLflow artifact folder (a plot under the MLflow handler's ``artifacts`` folders is
            left to that handler).
        phase: None for validation during training (file and title name the trainer's epoch), else the
            phase's name (``"evaluation"``): ``<prefix>.png``, titled with the phase and split.
        split: the datalist split the images come from (``"test"``), shown after the phase.
        name: method / run label of the title; default the experiment and run name of ``mlflow_handler``.
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        mlflow_handler=None,
        pred_key: str = "pred",
        prefix: str = "mode_frequencies",
        min_coverage: float = 0.5,
        max_images: int = 12,
        artifact_path: str = "truth",
        phase: str | None = None,
        split: str | None = None,
        name: str | None = None,
    ) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.pred_key = pred_key
        self.prefix = prefix
        self.min_coverage = float(min_coverage)
        self.max_images = int(max_images)
        self.artifact_path = artifact_path
        self.phase = phase
        self.split = split
        self.name = name
        self.written: list[Path] = []
        self.reset()

    def reset(self) -> None:
        self._scores: dict[str, list[torch.Tensor]] = {name: [] for name in TRUTH_METRIC_NAMES}
        self._probabilities: list[torch.Tensor] = []
        self._frequencies: list[torch.Tensor] = []
        self._mode_masks: list[torch.Tensor] = []
        self._case_ids: list = []
        self._num_samples = 0

    def attach(self, engine: Engine) -> None:
        # EPOCH_COMPLETED, as MONAI's metric handlers: attach this handler before StatsHandler and
        # MLFlowHandler (first in the evaluator's handler list) so that they log this run's values
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    def update(self, engine: Engine) -> None:
        output, batch = engine.state.output, engine.state.batch
        if not isinstance(batch, Mapping) or "truth_modes" not in batch:
            return
        if not isinstance(output, Mapping) or self.pred_key not in output:
            raise KeyError(
                f"TruthMetricsHandler: the engine output has no '{self.pred_key}' "
                "(set decollate=False on the evaluator)."
            )
        samples = _tensor(output[self.pred_key]).detach().cpu()
        if samples.ndim == 5:  # consensus diffusion: B x C x G x H x W per-level draws
            samples = samples.flatten(1, 2)
        preds = samples > 0.5
        truth = {key: _tensor(batch[f"truth_{key}"]).cpu() for key in TRUTH_KEYS if f"truth_{key}" in batch}
        mode_mask = truth["mode_mask"].bool()
        probabilities = truth["probabilities"].double()
        if "region_mask" in truth:
            # a spatial crop (e.g. AmbDiffSeg's LIDC crops) can cut a lobe out of view: score the lobes left
            truth["region_mask"] = truth["region_mask"].bool() & (truth["regions"] > 0.5).flatten(2).any(-1)
        has_regions = "region_mask" in truth and bool(truth["region_mask"].any())
        scores = truth_scores(
            preds,
            truth["modes"] > 0.5,
            probabilities,
            mode_mask,
            regions=truth["regions"] > 0.5 if has_regions else None,
            region_probabilities=truth.get("region_probabilities") if has_regions else None,
            region_mask=truth["region_mask"].bool() if has_regions else None,
            min_coverage=self.min_coverage,
        )
        for name in ("ged", "mode_tv", "empty_error", "lobe_error"):
            values = scores[name]
            self._scores[f"truth_{name}"].append(values[~values.isnan()])
        self._scores["isolated_pixels"].append(isolated_pixel_fraction(preds))
        self._probabilities.append(probabilities)
        self._frequencies.append(scores["frequencies"])
        self._mode_masks.append(mode_mask)
        case_ids = batch.get("case_id")
        self._case_ids.extend(list(case_ids) if case_ids is not None else [None] * len(preds))
        self._num_samples = preds.shape[1]

    def results(self) -> dict[str, float]:
        """Mean of each metric over the images seen since the last reset (metrics without data are left out)."""
        return {name: float(torch.cat(v).mean()) for name, v in self._scores.items() if v and torch.cat(v).numel()}

    def title(self, engine: Engine, results: Mapping[str, float]) -> str:
        """``sampled vs true mode frequencies (evaluation, test split, N = 16 samples per image; mode TV 0.081,
        GED to truth 0.017)`` under a first line with the method and run (``cimd · cimd_20260101_120000``: on
        one line, a long run name would be cut off); validation during training names the epoch
        (``... (epoch 10, N = 4 samples per image; ...)``)."""
        what = phase_caption(self.phase, self.split, engine.state.epoch, self._num_samples)
        scores = f"mode TV {results['truth_mode_tv']:.3f}, GED to truth {results['truth_ged']:.3f}"
        title = f"sampled vs true mode frequencies ({what}; {scores})"
        label = self.name or run_label(self.mlflow_handler)
        return f"{label}\n{title}" if label else title

    def complete(self, engine: Engine) -> None:
        results = self.results()
        if not results:
            return
        engine.state.metrics.update(results)
        if self.output_dir is None:
            return
        path = render_mode_frequencies(
            torch.cat(self._probabilities).numpy(),
            torch.cat(self._frequencies).numpy(),
            torch.cat(self._mode_masks).numpy(),
            self._num_samples,
            self.output_dir / f"{figure_stem(self.prefix, self.phase, engine.state.epoch)}.png",
            case_ids=self._case_ids,
            max_images=self.max_images,
            title=self.title(engine, results),
        )
        self.written.append(path)
        if self.mlflow_handler is not None:
            log_figure(self.mlflow_handler, path, self.artifact_path)
