"""Engine pieces for MONAI's SupervisedTrainer / SupervisedEvaluator: prepare_batch, inferers, helpers."""

from ambiseg_monai.engines.bundle_helpers import (
    BundleExit,
    BundleInputError,
    DatasetNotPreparedError,
    InferenceInputError,
    cpu_autocast_dtype,
    cpu_has_native_bf16,
    inference_items,
    network_to_device,
    padded_rater_count,
    prepare_dataset,
    use_amp,
)
from ambiseg_monai.engines.consensus import CombineConsensusSamples, ConsensusSamplingInferer, UnpackPredictiond
from ambiseg_monai.engines.continuous_training import WarmupConstantCosine
from ambiseg_monai.engines.inferers import (
    DiffusionSamplingInferer,
    DiffusionTrainingInferer,
    PerImageSeedingInferer,
    mask_to_symmetric,
    sample_statistics,
)
from ambiseg_monai.engines.latent_models import (
    LatentSampleInferer,
    LatentTrainingInferer,
    PHiSegELBOLoss,
    ProbUNetELBOLoss,
)
from ambiseg_monai.engines.prepare_batch import DiffusionTrainingPrepareBatch, SamplingPrepareBatch

__all__ = [
    "DiffusionSamplingInferer",
    "PerImageSeedingInferer",
    "DiffusionTrainingInferer",
    "DiffusionTrainingPrepareBatch",
    "SamplingPrepareBatch",
    "mask_to_symmetric",
    "sample_statistics",
    "inference_items",
    "BundleExit",
    "BundleInputError",
    "DatasetNotPreparedError",
    "InferenceInputError",
    "network_to_device",
    "padded_rater_count",
    "prepare_dataset",
    "use_amp",
    "cpu_autocast_dtype",
    "cpu_has_native_bf16",
    "CombineConsensusSamples",
    "ConsensusSamplingInferer",
    "UnpackPredictiond",
    "WarmupConstantCosine",
    "LatentSampleInferer",
    "LatentTrainingInferer",
    "PHiSegELBOLoss",
    "ProbUNetELBOLoss",
]
