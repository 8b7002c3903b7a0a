"""The MONAI Deploy application: DICOM study or NIfTI image -> N plausible masks, consensus, mean/variance maps.

DICOM input::

    DICOMDataLoaderOperator -> ModalitySeriesSelectorOperator -> SeriesVolumeOperator
        -> AmbiguousSegmentationOperator -> DICOMSegWriterOperator (+ the selected series)
                                         -> NiftiMapsWriterOperator

NIfTI input::

    NiftiVolumeLoaderOperator -> AmbiguousSegmentationOperator -> NiftiMapsWriterOperator (with masks)

Run it with ``python -m ambiseg_monai.deploy -i INPUT -o OUTPUT -m MODEL`` (see
:mod:`ambiseg_monai.deploy.__main__`, which also gives the Holoscan runtime the stack it needs), or
from Python with :func:`run_application`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from holoscan.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator

from ambiseg_monai.deploy.inputs import describe_input, resolve_model_path
from ambiseg_monai.deploy.operators import (
    AmbiguousSegmentationOperator,
    DICOMSegWriterOperator,
    ModalitySeriesSelectorOperator,
    NiftiMapsWriterOperator,
    NiftiVolumeLoaderOperator,
    SeriesVolumeOperator,
)

__all__ = ["DeploySettings", "AmbiguousSegmentationApp", "run_application", "HOLOSCAN_STACK_BYTES"]

logger = logging.getLogger(__name__)

HOLOSCAN_STACK_BYTES = 32 * 1024 * 1024  # the stack the Holoscan runtime asks for (`ulimit -s 32768`)


def _main_stack_bytes() -> float:
    try:
        import resource
    except ImportError:
        return float("inf")
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    return float("inf") if soft == resource.RLIM_INFINITY else float(soft)


def _call_with_stack(function: Callable[[], None], stack_bytes: int) -> None:
    """Call ``function`` on a thread with a ``stack_bytes`` stack; re-raise its exception here."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            function()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread, which re-raises it
            errors.append(error)

    previous = threading.stack_size(stack_bytes)
    try:
        worker = threading.Thread(target=target, name="ambiseg-deploy")
        worker.start()
    finally:
        threading.stack_size(previous)
    worker.join()
    if errors:
        raise errors[0]


@dataclass
class DeploySettings:
    """What one run of the application does.

    Attributes:
        input: a DICOM folder or a NIfTI file.
        output: the output folder (created).
        model: the exported ``model.ts``, or a folder holding exactly one ``.ts``.
        slices: ``"all"`` or a selection like ``"0,3,5-7"`` (0-based, in the volume's sorted order).
        num_samples: N (default: the bundle's).
        num_inference_steps: diffusion sampling steps (default: the bundle's).
        class_label: class label for level / rater conditioned models.
        batch_size: slices per inferer call.
        device: ``"cpu"`` or ``"cuda"``...
        engine: where a diffusion model's denoiser calls run: ``"torch"``, ``"onnxruntime"`` or
            ``"openvino"`` (CPU inference engines, the ``cpu-engines`` extra).
        precision: ``"float32"`` or ``"bfloat16"`` (None: the bundle's with ``"torch"``, float32 with an engine).
    """

    input: str | os.PathLike
    output: str | os.PathLike
    model: str | os.PathLike
    slices: str = "all"
    num_samples: int | None = None
    num_inference_steps: int | None = None
    class_label: int | None = None
    batch_size: int = 4
    device: str = "cpu"
    engine: str = "torch"
    precision: str | None = None


class AmbiguousSegmentationApp(Application):
    """Holoscan application wiring the operators for the input's kind (see module docstring)."""

    name = "ambiseg-deploy"
    description = "Ambiguous segmentation: N plausible masks, consensus, mean and variance maps."

    def __init__(self, settings: DeploySettings, input_kind: str, *args, **kwargs):
        self.settings = settings
        self.input_kind = input_kind
        super().__init__(*args, **kwargs)

    def compose(self):
        s = self.settings
        inference = AmbiguousSegmentationOperator(
            self,
            model_path=s.model,
            slices=s.slices,
            num_samples=s.num_samples,
            num_inference_steps=s.num_inference_steps,
            class_label=s.class_label,
            batch_size=s.batch_size,
            device=s.device,
            engine=s.engine,
            precision=s.precision,
            name="ambiguous_segmentation",
        )
        maps_writer = NiftiMapsWriterOperator(
            self, output_folder=s.output, write_masks=self.input_kind == "nifti", name="nifti_maps_writer"
        )
        if self.input_kind == "nifti":
            loader = NiftiVolumeLoaderOperator(self, CountCondition(self, 1), input_path=s.input, name="nifti_loader")
            self.add_flow(loader, inference, {("image", "image")})
        else:
            loader = DICOMDataLoaderOperator(
                self, CountCondition(self, 1), input_folder=Path(s.input), name="dicom_loader"
            )
            selector = ModalitySeriesSelectorOperator(self, modalities=inference.modalities, name="series_selector")
            volume = SeriesVolumeOperator(self, name="series_to_volume")
            seg_writer = DICOMSegWriterOperator(self, output_folder=s.output, name="dicom_seg_writer")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(volume, inference, {("image", "image")})
            self.add_flow(inference, seg_writer, {("prediction", "prediction")})
            self.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, maps_writer, {("prediction", "prediction")})


def run_application(settings: DeploySettings) -> Path:
    """Check the inputs, then run the application; returns the output folder.

    The graph runs on a thread with a 32 MiB stack when the process's own stack limit is smaller.

    Raises:
        FileNotFoundError / ValueError: a missing or invalid model, an input without DICOM or without
            a series of the model's modality, a bad slice selection (before the graph starts when the
            headers tell), or any error raised inside the graph.
        ImportError: the engine's package is not installed (before anything is read).
    """
    from ambiseg_monai.deploy.exported import load_exported_bundle
    from ambiseg_monai.deploy.predictor import check_engine

    check_engine(settings.engine, settings.precision, settings.device)  # a missing engine fails before any work

    model = resolve_model_path(settings.model)
    export = load_exported_bundle(model).export  # fails early on a file that is not an exported model
    description = describe_input(settings.input, export.get("modalities", ["CT", "MR"]))
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    resolved = DeploySettings(**{**settings.__dict__, "model": str(model), "output": str(output)})
    logger.info("input %s (%s), model %s, output %s", settings.input, description.kind, model, output)
    logger.info("engine %s, precision %s", settings.engine, settings.precision or "the default")
    app = AmbiguousSegmentationApp(resolved, description.kind)
    if _main_stack_bytes() >= HOLOSCAN_STACK_BYTES:
        app.run()
    else:
        # the process started with a smaller stack (no `ulimit -s 32768`): run the graph on a thread that has it
        _call_with_stack(app.run, HOLOSCAN_STACK_BYTES)
    return output
