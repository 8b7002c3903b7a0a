"""MONAI Deploy (Holoscan) operators of the ambiguous-segmentation application.

- :class:`ModalitySeriesSelectorOperator`: the SDK's series selector restricted to the model's
  modalities (the series with the most instances wins); fails clearly when nothing matches.
- :class:`SeriesVolumeOperator`: the SDK's series-to-volume operator, plus the series' RAS affine
  in the image metadata (also for a single slice, where the SDK leaves it unset).
- :class:`NiftiVolumeLoaderOperator`: a NIfTI file -> the same D x H x W ``Image``.
- :class:`AmbiguousSegmentationOperator`: **bundle-generic**: runs the N-sample ``inferer`` that
  the exported bundle's own ``inference.json`` defines (diffusion or latent model) on the chosen slices.
- :class:`DICOMSegWriterOperator`: the N masks + consensus as a DICOM SEG (highdicom).
- :class:`NiftiMapsWriterOperator`: mean and variance maps (and, for NIfTI input, the masks) as NIfTI.

Ports carry plain Python objects: ``image`` (:class:`monai.deploy.core.domain.image.Image`),
``prediction`` (a dict: ``"prediction"`` :class:`~ambiseg_monai.deploy.predictor.SlicePrediction`,
``"affine"`` 4 x 4 RAS, ``"model"`` name and version), ``study_selected_series_list`` (SDK).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.image import Image
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

from ambiseg_monai.deploy.dicom_seg import build_ambiguous_segmentation
from ambiseg_monai.deploy.predictor import AmbiguousSlicePredictor
from ambiseg_monai.deploy.volumes import read_nifti_volume, series_affine, write_nifti_volume

__all__ = [
    "ModalitySeriesSelectorOperator",
    "SeriesVolumeOperator",
    "NiftiVolumeLoaderOperator",
    "AmbiguousSegmentationOperator",
    "DICOMSegWriterOperator",
    "NiftiMapsWriterOperator",
    "SEG_FILENAME",
    "MEAN_FILENAME",
    "VARIANCE_FILENAME",
    "SAMPLES_FILENAME",
    "CONSENSUS_FILENAME",
    "SUMMARY_FILENAME",
]

SEG_FILENAME = "seg.dcm"
MEAN_FILENAME = "mean.nii.gz"
VARIANCE_FILENAME = "variance.nii.gz"
SAMPLES_FILENAME = "samples.nii.gz"
CONSENSUS_FILENAME = "consensus.nii.gz"
SUMMARY_FILENAME = "prediction.json"

logger = logging.getLogger(__name__)


def _selected_series(study_selected_series_list):
    if not study_selected_series_list or not study_selected_series_list[0].selected_series:
        raise ValueError("no DICOM series was selected.")
    return study_selected_series_list[0].selected_series[0].series


class ModalitySeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """Select the image series of an accepted modality with the most instances.

    Named input ``dicom_study_list``; named output ``study_selected_series_list``.

    Args:
        modalities: accepted DICOM modalities (e.g. ``["CT", "MR"]``).
    """

    def __init__(self, fragment: Fragment, *args, modalities: list[str] | tuple[str, ...] = ("CT", "MR"), **kwargs):
        self.modalities = [m.upper() for m in modalities]
        pattern = "(?i)^(" + "|".join(self.modalities) + ")$"
        rules = json.dumps({"selections": [{"name": "image series", "conditions": {"Modality": pattern}}]})
        super().__init__(fragment, *args, rules=rules, all_matched=True, sort_by_sop_instance_count=True, **kwargs)

    def compute(self, op_input, op_output, context):
        studies = op_input.receive(self.input_name_study_list)
        selected = self.filter(self._load_rules(), studies, self._all_matched, self._sort_by_sop_instance_count)
        if not selected:
            found = [
                f"{series.SeriesInstanceUID} (modality {series.Modality})"
                for study in studies or []
                for series in study.get_all_series()
            ]
            raise ValueError(f"no {'/'.join(self.modalities)} series in the input study; found {found or 'no series'}.")
        series = selected[0].selected_series[0].series
        logger.info(
            "selected series %s (%s, %d instances)",
            series.SeriesInstanceUID,
            series.Modality,
            len(series.get_sop_instances()),
        )
        op_output.emit(selected, self.output_name_selected_series)


class SeriesVolumeOperator(DICOMSeriesToVolumeOperator):
    """The SDK's DICOM series -> D x H x W ``Image``; ``metadata()["affine"]`` is the series' RAS affine."""

    def convert_to_image(self, study_selected_series_list):
        image = super().convert_to_image(study_selected_series_list)
        if image is None:
            raise ValueError("the selected DICOM series holds no image to segment")
        instances = _selected_series(study_selected_series_list).get_sop_instances()  # sorted by the SDK
        image.metadata()["affine"] = series_affine([i.get_native_sop_instance() for i in instances])
        return image


class NiftiVolumeLoaderOperator(Operator):
    """Load one NIfTI file as a D x H x W ``Image`` (metadata: ``affine``, ``source_path``).

    Named output ``image``.
    """

    def __init__(self, fragment: Fragment, *args, input_path: str | os.PathLike, **kwargs):
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def compute(self, op_input, op_output, context):
        volume, affine = read_nifti_volume(self.input_path)
        op_output.emit(Image(volume, {"affine": affine, "source_path": str(self.input_path)}), "image")


class AmbiguousSegmentationOperator(Operator):
    """N plausible masks per slice from any exported bundle, with the bundle's own inferer.

    Named input ``image`` (D x H x W ``Image`` with ``metadata()["affine"]``); named output
    ``prediction``. The model is loaded when the operator is created, so a missing or invalid model
    fails before the graph runs.

    Args:
        model_path: exported ``model.ts`` (``ambiseg export``).
        slices: ``"all"``/None or a selection like ``"0,3,5-7"`` (0-based, volume order).
        num_samples, num_inference_steps, class_label, batch_size, device, engine, precision: see
            :class:`~ambiseg_monai.deploy.predictor.AmbiguousSlicePredictor`.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        model_path: str | os.PathLike,
        slices: str | None = None,
        num_samples: int | None = None,
        num_inference_steps: int | None = None,
        class_label: int | None = None,
        batch_size: int = 4,
        device: str = "cpu",
        engine: str = "torch",
        precision: str | None = None,
        **kwargs,
    ):
        self.predictor = AmbiguousSlicePredictor(
            model_path,
            num_samples=num_samples,
            num_inference_steps=num_inference_steps,
            class_label=class_label,
            batch_size=batch_size,
            device=device,
            engine=engine,
            precision=precision,
        )
        self.slices = slices
        super().__init__(fragment, *args, **kwargs)

    @property
    def modalities(self) -> list[str]:
        return self.predictor.modalities

    def setup(self, spec: OperatorSpec):
        spec.input("image")
        spec.output("prediction")

    def compute(self, op_input, op_output, context):
        image = op_input.receive("image")
        volume = np.asarray(image.asnumpy())
        metadata = image.metadata()
        prediction = self.predictor.predict(volume, self.slices)
        bundle = self.predictor.bundle
        logger.info("segmented %d slice(s) x %d samples", len(prediction.slice_indices), prediction.num_samples)
        op_output.emit(
            {
                "prediction": prediction,
                "affine": np.asarray(metadata.get("affine") if metadata.get("affine") is not None else np.eye(4)),
                "model": {
                    "name": str(bundle.export.get("bundle_name", "ambiseg"))[:64],
                    "version": str(bundle.metadata.get("version", "0"))[:64],
                },
            },
            "prediction",
        )


class DICOMSegWriterOperator(Operator):
    """Write ``seg.dcm``: a BINARY DICOM SEG with segments Sample 1..N and Consensus on the processed slices.

    Named inputs ``prediction`` and ``study_selected_series_list``.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: str | os.PathLike, **kwargs):
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("prediction")
        spec.input("study_selected_series_list")

    def compute(self, op_input, op_output, context):
        result = op_input.receive("prediction")
        series = _selected_series(op_input.receive("study_selected_series_list"))
        prediction = result["prediction"]
        instances = series.get_sop_instances()
        sources = [instances[k].get_native_sop_instance() for k in prediction.slice_indices]
        seg = build_ambiguous_segmentation(
            sources,
            prediction.samples,
            prediction.consensus,
            algorithm_name=result["model"]["name"],
            algorithm_version=result["model"]["version"],
        )
        self.output_folder.mkdir(parents=True, exist_ok=True)
        path = self.output_folder / SEG_FILENAME
        seg.save_as(path)
        logger.info("wrote %s", path)


class NiftiMapsWriterOperator(Operator):
    """Write the mean and variance maps (``mean.nii.gz``, ``variance.nii.gz``) on the input's grid.

    Slices that were not processed are 0 in both maps; ``prediction.json`` lists the processed ones.
    With ``write_masks`` also ``samples.nii.gz`` (X x Y x Z x N uint8) and ``consensus.nii.gz``
    (used for NIfTI input, where no DICOM SEG can be written).

    Named input ``prediction``.
    """

    def __init__(
        self, fragment: Fragment, *args, output_folder: str | os.PathLike, write_masks: bool = False, **kwargs
    ):
        self.output_folder = Path(output_folder)
        self.write_masks = bool(write_masks)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("prediction")

    def compute(self, op_input, op_output, context):
        result = op_input.receive("prediction")
        prediction, affine = result["prediction"], result["affine"]
        self.output_folder.mkdir(parents=True, exist_ok=True)
        files = {"mean": MEAN_FILENAME, "variance": VARIANCE_FILENAME}
        write_nifti_volume(self.output_folder / MEAN_FILENAME, prediction.full_volume(prediction.mean), affine)
        write_nifti_volume(self.output_folder / VARIANCE_FILENAME, prediction.full_volume(prediction.variance), affine)
        if self.write_masks:
            samples = prediction.full_volume(prediction.samples.transpose(0, 2, 3, 1))  # D x H x W x N
            write_nifti_volume(self.output_folder / SAMPLES_FILENAME, samples, affine)
            write_nifti_volume(
                self.output_folder / CONSENSUS_FILENAME, prediction.full_volume(prediction.consensus), affine
            )
            files.update(samples=SAMPLES_FILENAME, consensus=CONSENSUS_FILENAME)
        summary: dict[str, Any] = {
            "model": result["model"],
            "num_samples": prediction.num_samples,
            "volume_shape": list(prediction.volume_shape),
            "processed_slices": prediction.slice_indices,
            "files": files,
        }
        (self.output_folder / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2))
        logger.info("wrote %s", ", ".join(files.values()))
