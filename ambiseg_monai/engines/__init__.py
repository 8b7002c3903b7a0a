"""Engine pieces for MONAI's SupervisedTrainer / SupervisedEvaluator: prepare_batch, inferers, helpers."""

from ambiseg_monai.engines.bundle_helpers import (
    inference_items,
    network_to_device,
    padded_rater_count,
    prepare_dataset,
    use_amp,
)
from ambiseg_monai.engines.inferers import (
    DiffusionSamplingInferer,
    DiffusionTrainingInferer,
    mask_to_symmetric,
    sample_statistics,
)
from ambiseg_monai.engines.prepare_batch import DiffusionTrainingPrepareBatch, SamplingPrepareBatch

__all__ = [
    "DiffusionSamplingInferer",
    "DiffusionTrainingInferer",
    "DiffusionTrainingPrepareBatch",
    "SamplingPrepareBatch",
    "mask_to_symmetric",
    "sample_statistics",
    "inference_items",
    "network_to_device",
    "padded_rater_count",
    "prepare_dataset",
    "use_amp",
]
