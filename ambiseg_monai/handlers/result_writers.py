"""Evaluation and inference outputs: per-image metric tables and NIfTI sample maps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from ambiseg_monai.data.nifti import save_channel_first_nifti

__all__ = ["PerImageMetricsWriter", "NiftiSampleWriter"]


def _batch_field(batch, key):
    if isinstance(batch, dict):
        return batch.get(key)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict):
        return [item.get(key) for item in batch]
    return None


class PerImageMetricsWriter:
    """At ``Events.COMPLETED``, write ``<prefix>per_image.csv`` and ``<prefix>summary.json``.

    The per-image values come from ``engine.state.metric_details`` (filled by
    :class:`~ambiseg_monai.handlers.AmbiguousSegmentationMetricsHandler` with ``save_details=True``),
    the row names from the batches' ``id_key`` in iteration order. The summary holds, per metric, the
    mean, standard deviation, median, min and max over images, and the number of images.

    Args:
        output_dir: destination folder (created).
        prefix: file-name prefix (e.g. ``"n4_"``).
        id_key: batch key of the case ids.
    """

    def __init__(self, output_dir: str | Path, prefix: str = "", id_key: str = "case_id") -> None:
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.id_key = id_key
        self._ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._ids = []

    def _collect(self, engine: Engine) -> None:
        ids = _batch_field(engine.state.batch, self.id_key)
        if ids is None:
            raise KeyError(f"PerImageMetricsWriter: the batch has no '{self.id_key}' to name the rows.")
        self._ids.extend(str(i) for i in ids)

    def _write(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", None) or {}
        if not details:
            raise RuntimeError("PerImageMetricsWriter: no per-image metric details; enable save_details on the metric handler.")
        columns = {name: torch.as_tensor(values).reshape(-1).double().cpu().numpy() for name, values in details.items()}
        lengths = {len(v) for v in columns.values()}
        if lengths != {len(self._ids)}:
            raise RuntimeError(f"per-image metric lengths {sorted(lengths)} do not match the {len(self._ids)} case ids.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        names = sorted(columns)
        with open(self.output_dir / f"{self.prefix}per_image.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", *names])
            for row, case in enumerate(self._ids):
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
        output = engine.state.output
        samples = output[self.pred_key] if isinstance(output, dict) else torch.stack([o[self.pred_key] for o in output])
        samples = torch.as_tensor(samples).detach().float().cpu()
        ids = _batch_field(engine.state.batch, self.id_key)
        paths = _batch_field(engine.state.batch, self.path_key)
        if ids is None or paths is None:
            raise KeyError(f"NiftiSampleWriter: the batch needs '{self.id_key}' and '{self.path_key}'.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for b, (case, path) in enumerate(zip(ids, paths)):
            affine = nib.load(str(path)).affine
            masks = samples[b].numpy()
            mean = masks.mean(axis=0, keepdims=True).astype(np.float32)
            variance = masks.var(axis=0, keepdims=True).astype(np.float32)
            for suffix, array in (("samples", masks.astype(np.uint8)), ("mean", mean), ("variance", variance)):
                target = self.output_dir / f"{case}_{suffix}.nii.gz"
                save_channel_first_nifti(target, array, affine)
                self.written.append(target)
