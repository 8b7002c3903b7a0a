"""Soft Dice against the number of generations (Amit et al. 2023, Fig. 3): computation and Ignite handler.

Consensus diffusion averages G generations per consensus level. Because every generation has its own
seeded generator (:class:`~ambiseg_monai.inferers.consensus.ConsensusSamplingInferer`), the first g
generations of one evaluation run are exactly a run with G = g, so the whole curve g = 1..G comes from
one run: :func:`soft_dice_by_generations` re-combines prefixes of the B x C x G x H x W samples.

:class:`GenerationCurveHandler` accumulates the per-image curves over an evaluation epoch, writes
``generation_curve.png`` and ``generation_curve.csv`` to ``output_dir``, and logs both (and the curve as
an MLflow metric series, step = g) to the run of a MONAI ``MLFlowHandler`` when one is given.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers.utils import from_engine
from monai.utils import evenly_divisible_all_gather

from ambiseg_monai.handlers.metrics import as_batch, rater_mask_from_batch
from ambiseg_monai.handlers.mlflow_logging import log_artifact, mlflow_run_id
from ambiseg_monai.metrics.soft_dice import CONSENSUS_PAPER_THRESHOLDS, QUBIQ_THRESHOLDS, soft_dice
from ambiseg_monai.transforms.consensus import combine_consensus_samples

__all__ = ["soft_dice_by_generations", "GenerationCurveHandler"]

DEFAULT_THRESHOLD_SETS = {"soft_dice": QUBIQ_THRESHOLDS, "soft_dice_5": CONSENSUS_PAPER_THRESHOLDS}


def soft_dice_by_generations(
    samples: torch.Tensor,
    raters: torch.Tensor,
    generations: Sequence[int] | None = None,
    thresholds: Sequence[float] = QUBIQ_THRESHOLDS,
    rater_mask: torch.Tensor | None = None,
    majority_vote: bool = True,
) -> torch.Tensor:
    """QUBIQ soft Dice of the consensus map built from the first g generations, for each g.

    Args:
        samples: B x C x G x H x W per-level generations in [0, 1].
        raters: B x M x H x W binary rater masks.
        generations: the g values (each in 1..G); default 1..G.
        thresholds: soft-Dice thresholds.
        rater_mask: optional B x M bool marking real raters.
        majority_vote: combine levels as the inferer does (see :func:`combine_consensus_samples`).

    Returns:
        B x len(generations) float64 tensor.
    """
    if samples.ndim != 5:
        raise ValueError(f"samples must be B x C x G x H x W, got shape {tuple(samples.shape)}.")
    total = samples.shape[2]
    generations = list(range(1, total + 1)) if generations is None else [int(g) for g in generations]
    if not generations or any(not 1 <= g <= total for g in generations):
        raise ValueError(f"generations must be non-empty values in 1..{total} (the samples' G), got {generations}.")
    columns = [
        soft_dice(
            combine_consensus_samples(samples[:, :, :g], majority_vote)["pred_soft"], raters, thresholds, rater_mask
        )
        for g in generations
    ]
    return torch.stack(columns, dim=1)


class GenerationCurveHandler:
    """Ignite handler: mean soft Dice vs number of generations over an evaluation epoch.

    Args:
        output_dir: folder for ``generation_curve.png`` / ``.csv`` (created when needed).
        threshold_sets: curve name -> soft-Dice thresholds (default: ``soft_dice`` with the 9 QUBIQ
            thresholds and ``soft_dice_5`` with the paper's 5).
        generations: the g values to evaluate (default: 1..G of the first batch).
        majority_vote: combine levels as the evaluator's inferer does.
        samples_key, label_key: ``engine.state.output`` keys of the B x C x G x H x W samples and of
            the B x M x H x W raters (a decollated list of per-image dicts works too).
        batch_transform: ``engine.state.batch`` -> B x M bool rater mask or None.
        mlflow_handler: a MONAI ``MLFlowHandler`` attached to the same engine; its run receives the PNG,
            the CSV and the metric series ``<curve name>_vs_generations`` (step = g). None: files only.
        per_epoch_files: append ``_epoch<k>`` (``engine.state.epoch``) to the file names, to keep one curve
            per validation round when attached to a validator.
    """

    def __init__(
        self,
        output_dir: str,
        threshold_sets: Mapping[str, Sequence[float]] | None = None,
        generations: Sequence[int] | None = None,
        majority_vote: bool = True,
        samples_key: str = "samples",
        label_key: str = "label",
        batch_transform: Callable[[Any], torch.Tensor | None] = rater_mask_from_batch,
        mlflow_handler: Any | None = None,
        per_epoch_files: bool = False,
    ) -> None:
        self.output_dir = str(output_dir)
        threshold_sets = DEFAULT_THRESHOLD_SETS if threshold_sets is None else threshold_sets
        self.threshold_sets = {str(k): tuple(v) for k, v in threshold_sets.items()}
        if not self.threshold_sets:
            raise ValueError("threshold_sets must name at least one curve.")
        self.generations = None if generations is None else [int(g) for g in generations]
        self.majority_vote = bool(majority_vote)
        self.samples_key = samples_key
        self.label_key = label_key
        self.batch_transform = batch_transform
        self.mlflow_handler = mlflow_handler
        self.per_epoch_files = per_epoch_files
        self._values: dict[str, list[torch.Tensor]] = {}
        self._generations: list[int] | None = None
        self.curves: dict[str, list[float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Engine | None = None) -> None:
        self._values = {name: [] for name in self.threshold_sets}
        self._generations = self.generations

    def iteration_completed(self, engine: Engine) -> None:
        try:
            samples, raters = from_engine([self.samples_key, self.label_key])(engine.state.output)
        except KeyError as error:
            raise KeyError(
                f"GenerationCurveHandler: engine.state.output needs '{self.samples_key}' (B x C x G x H x W, "
                f"ConsensusSamplingInferer with return_samples=True) and '{self.label_key}' (raters)."
            ) from error
        samples, raters = as_batch(samples, "samples"), as_batch(raters, "label")
        rater_mask = self.batch_transform(engine.state.batch)
        if not self._values:  # used without attach(): no EPOCH_STARTED reset happened
            self.reset()
        if self._generations is None:
            self._generations = list(range(1, samples.shape[2] + 1))
        for name, thresholds in self.threshold_sets.items():
            values = soft_dice_by_generations(
                samples, raters, self._generations, thresholds, rater_mask=rater_mask, majority_vote=self.majority_vote
            )
            self._values[name].append(values.cpu())

    def compute(self) -> dict[str, list[float]]:
        """Curve name -> mean over all images (all ranks) of the soft Dice at each g."""
        curves = {}
        for name, chunks in self._values.items():
            if not chunks:
                raise RuntimeError("GenerationCurveHandler: no batch was evaluated in this epoch.")
            values = torch.cat(chunks)
            if idist.get_world_size() > 1:
                # ranks may hold different numbers of images (MONAI's gather pads and trims);
                # NCCL gathers device tensors only
                values = evenly_divisible_all_gather(values.to(idist.device()), concat=True).cpu()
            curves[name] = [float(v) for v in values.mean(dim=0)]
        return curves

    def epoch_completed(self, engine: Engine) -> None:
        self.curves = self.compute()
        if idist.get_rank() != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        suffix = f"_epoch{engine.state.epoch}" if self.per_epoch_files else ""
        png = os.path.join(self.output_dir, f"generation_curve{suffix}.png")
        table = os.path.join(self.output_dir, f"generation_curve{suffix}.csv")
        self._write_csv(table)
        self._plot(png)
        self._log_mlflow([png, table])

    def _write_csv(self, path: str) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["generations", *self.curves])
            for i, g in enumerate(self._generations or []):
                writer.writerow([g, *(f"{self.curves[name][i]:.6f}" for name in self.curves)])

    def _plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.5), dpi=100)
        for name, values in self.curves.items():
            axis.plot(self._generations or [], values, marker="o", markersize=3, label=name)
        axis.set_xlabel("number of generations per level")
        axis.set_ylabel("soft Dice")
        axis.set_title("Soft Dice vs. number of generations")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)

    def _log_mlflow(self, paths: Sequence[str]) -> None:
        handler = self.mlflow_handler
        run_id = mlflow_run_id(handler) if handler is not None else None
        if handler is None or run_id is None:
            return
        for name, values in self.curves.items():
            for g, value in zip(self._generations or [], values, strict=True):
                handler.client.log_metric(run_id, f"{name}_vs_generations", value, step=int(g))
        for path in paths:
            log_artifact(handler, path, "generation_curve")
