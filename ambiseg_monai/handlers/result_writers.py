"""Evaluation and inference outputs: per-image metric tables and NIfTI sample maps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import MetricsSaver
from monai.utils import string_list_all_gather

from ambiseg_monai.data.nifti import save_channel_first_nifti
from ambiseg_monai.handlers.metrics import CaseIdMeta, as_batch, batch_field

__all__ = ["PerImageMetricsWriter", "NiftiSampleWriter"]


class PerImageMetricsWriter(MetricsSaver):
    """MONAI's ``MetricsSaver`` writing one per-image table with case ids: ``<prefix>per_image.csv`` (a
    ``case_id`` column, then one column per metric) and ``<prefix>summary.json``, at the end of each epoch.

    The per-image values come from ``engine.state.metric_details`` (filled by
    :class:`~ambiseg_monai.handlers.AmbiguousSegmentationMetricsHandler` with ``save_details=True``), the row
    names from the batches' ``id_key`` (MetricsSaver's ``batch_transform`` is :class:`CaseIdMeta`; in a
    distributed evaluation MetricsSaver gathers them from all ranks and only ``save_rank`` writes). The
    summary holds, per metric, the mean, standard deviation, median, min and max over images, and the number
    of images.

    Why not MetricsSaver's own files: ``ambiseg compare`` and :mod:`ambiseg_monai.reporting` read one table
    per number of samples, ``n<N>_per_image.csv`` with all metrics as columns at full precision
    (:mod:`ambiseg_monai.reporting.naming`); ``MetricsSaver`` writes one ``<metric>_raw.csv`` per metric with
    4 decimals and no file-name prefix.

    Args:
        output_dir: destination folder (created).
        prefix: file-name prefix (``"n4_"`` -> ``n4_per_image.csv``, the name the reporting reads).
        id_key: batch key of the case ids.
        metric_details: which ``metric_details`` to write (``"*"``: all), as for ``MetricsSaver``.
        save_rank: the rank that writes in a distributed evaluation.
    """

    def __init__(
        self,
        output_dir: str | Path,
        prefix: str = "",
        id_key: str = "case_id",
        metric_details: str | list[str] = "*",
        save_rank: int = 0,
    ) -> None:
        super().__init__(
            save_dir=str(output_dir),
            metrics=None,
            metric_details=metric_details,
            batch_transform=CaseIdMeta(id_key),
            save_rank=save_rank,
        )
        self.output_dir = Path(output_dir)
        self.prefix = prefix

    def __call__(self, engine: Engine) -> None:
        case_ids = self._gathered_filenames()
        if idist.get_rank() != self.save_rank:
            return
        details = getattr(engine.state, "metric_details", None) or {}
        selected = self.metric_details or ()
        wanted = {k: v for k, v in details.items() if "*" in selected or k in selected}
        if not wanted:
            raise RuntimeError(
                f"{type(self).__name__}: no per-image metric details; enable save_details on the metric handler."
            )
        columns = {name: torch.as_tensor(values).reshape(-1).double().cpu().numpy() for name, values in wanted.items()}
        lengths = {len(v) for v in columns.values()}
        if lengths != {len(case_ids)}:
            raise RuntimeError(f"per-image metric lengths {sorted(lengths)} do not match the {len(case_ids)} case ids.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        names = sorted(columns)
        with open(self.output_dir / f"{self.prefix}per_image.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", *names])
            for row, case in enumerate(case_ids):
                writer.writerow([case, *(f"{columns[n][row]:.6f}" for n in names)])
        summary = {
            name: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v)),
                "median": float(np.median(v)),
                "min": float(np.min(v)),
                "max": float(np.max(v)),
                "num_images": int(len(v)),
            }
            for name, v in columns.items()
        }
        (self.output_dir / f"{self.prefix}summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")

    def _gathered_filenames(self) -> list[str]:
        """The case ids of every rank, in MetricsSaver's order (what it would write as row names)."""
        if idist.get_world_size() > 1:
            return string_list_all_gather(strings=self._filenames)
        return list(self._filenames)


class NiftiSampleWriter:
    """After each iteration, write every image's samples, mean map and variance map as NIfTI.

    Files per case (``<case>`` from ``id_key``), in the data contract's layout and with the affine
    of the input image file (``path_key``), so they overlay the input in any viewer:

    - ``<case>_samples.nii.gz``: N x H x W uint8 masks (one channel per sample);
    - ``<case>_mean.nii.gz``: 1 x H x W float32, fraction of samples marking each pixel;
    - ``<case>_variance.nii.gz``: 1 x H x W float32, p (1 - p).

    Args:
        output_dir: destination folder (created).
        id_key, path_key: batch keys of the case ids and of the input image paths.
        pred_key: output key of the B x N x H x W samples.
    """

    def __init__(
        self, output_dir: str | Path, id_key: str = "case_id", path_key: str = "image_path", pred_key: str = "pred"
    ) -> None:
        self.output_dir = Path(output_dir)
        self.id_key = id_key
        self.path_key = path_key
        self.pred_key = pred_key
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        samples = batch_field(engine.state.output, self.pred_key)
        if samples is None:
            raise KeyError(f"NiftiSampleWriter: engine.state.output has no '{self.pred_key}' entry.")
        samples = as_batch(samples, self.pred_key).detach().float().cpu()
        ids = batch_field(engine.state.batch, self.id_key)
        paths = batch_field(engine.state.batch, self.path_key)
        if ids is None or paths is None:
            raise KeyError(f"NiftiSampleWriter: the batch needs '{self.id_key}' and '{self.path_key}'.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for b, (case, path) in enumerate(zip(ids, paths, strict=True)):
            affine = nib.load(str(path)).affine
            masks = samples[b].numpy()
            mean = masks.mean(axis=0, keepdims=True).astype(np.float32)
            variance = masks.var(axis=0, keepdims=True).astype(np.float32)
            for suffix, array in (("samples", masks.astype(np.uint8)), ("mean", mean), ("variance", variance)):
                target = self.output_dir / f"{case}_{suffix}.nii.gz"
                save_channel_first_nifti(target, array, affine)
                self.written.append(target)
