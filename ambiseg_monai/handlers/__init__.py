"""Ignite handlers: metric handlers (and, in their own modules, sample logging and MLflow helpers)."""

from ambiseg_monai.handlers.metrics import (
    SNCC,
    AmbiguousSegmentationMetricsHandler,
    CaseIdMeta,
    CollectiveInsight,
    CrossPairDice,
    CrossPairIoU,
    GeneralizedEnergyDistance,
    HungarianMatchedIoU,
    RaterAwareMetricHandler,
    SampleDiversity,
    SoftDice,
    rater_mask_from_batch,
)

__all__ = [
    "AmbiguousSegmentationMetricsHandler",
    "RaterAwareMetricHandler",
    "GeneralizedEnergyDistance",
    "SampleDiversity",
    "CollectiveInsight",
    "HungarianMatchedIoU",
    "CrossPairDice",
    "CrossPairIoU",
    "SoftDice",
    "SNCC",
    "CaseIdMeta",
    "rater_mask_from_batch",
]

# training/evaluation helpers (checkpoint resume, gradient clipping, loss logging, MLflow, PNG grids)
from ambiseg_monai.handlers.checkpoint import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    RequiredCheckpointLoader,
    ResumableCheckpointer,
    atomic_save,
    latest_checkpoint,
)
from ambiseg_monai.handlers.gradient_clipping import GradientClipping
from ambiseg_monai.handlers.loss_terms import loss_terms_from_output
from ambiseg_monai.handlers.mlflow_logging import MLflowConfigLogger, default_run_name
from ambiseg_monai.handlers.sample_images import SampleGridHandler, render_sample_grid

__all__ += [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "atomic_save",
    "GradientClipping",
    "MLflowConfigLogger",
    "RequiredCheckpointLoader",
    "ResumableCheckpointer",
    "SampleGridHandler",
    "default_run_name",
    "latest_checkpoint",
    "loss_terms_from_output",
    "render_sample_grid",
]
from ambiseg_monai.handlers.mlflow_logging import MLflowMetricsLogger
from ambiseg_monai.handlers.result_writers import NiftiSampleWriter, PerImageMetricsWriter

__all__ += ["MLflowMetricsLogger", "NiftiSampleWriter", "PerImageMetricsWriter"]
from ambiseg_monai.handlers.generation_curve import GenerationCurveHandler
from ambiseg_monai.handlers.provenance import ProvenanceHandler

__all__ += ["GenerationCurveHandler", "ProvenanceHandler"]
from ambiseg_monai.handlers.truth import TRUTH_KEYS, TRUTH_METRIC_NAMES, TruthMetricsHandler, render_mode_frequencies

__all__ += ["TruthMetricsHandler", "TRUTH_KEYS", "TRUTH_METRIC_NAMES", "render_mode_frequencies"]
from ambiseg_monai.handlers.mlflow_logging import GuardedMLFlowHandler
from ambiseg_monai.handlers.nonfinite import NonFiniteGuard, NonFiniteTrainingError

__all__ += ["GuardedMLFlowHandler", "NonFiniteGuard", "NonFiniteTrainingError"]
