"""Ignite handlers: the metric handler, per-image tables and sample writers, MLflow tracking (provenance,
prefixed metrics, a failure-tolerant ``MLFlowHandler``), loss-term logging, checkpoints, guards, PNG grids."""

from ambiseg_monai.handlers.checkpoint import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    RequiredCheckpointLoader,
    ResumableCheckpointer,
    atomic_save,
    latest_checkpoint,
)
from ambiseg_monai.handlers.generation_curve import GenerationCurveHandler
from ambiseg_monai.handlers.gradient_clipping import GradientClipping
from ambiseg_monai.handlers.loss_terms import LossTerms
from ambiseg_monai.handlers.metrics import (
    AmbiguousSegmentationMetricsHandler,
    CaseIdMeta,
    batch_field,
    rater_mask_from_batch,
)
from ambiseg_monai.handlers.mlflow_logging import (
    GuardedMLFlowHandler,
    MLflowMetricsLogger,
    ProvenanceHandler,
    default_run_name,
)
from ambiseg_monai.handlers.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from ambiseg_monai.handlers.result_writers import NiftiSampleWriter, PerImageMetricsWriter
from ambiseg_monai.handlers.sample_images import SampleGridHandler, render_sample_grid
from ambiseg_monai.handlers.truth import TRUTH_KEYS, TRUTH_METRIC_NAMES, TruthMetricsHandler, render_mode_frequencies

__all__ = [
    # metrics and results
    "AmbiguousSegmentationMetricsHandler",
    "CaseIdMeta",
    "batch_field",
    "rater_mask_from_batch",
    "PerImageMetricsWriter",
    "NiftiSampleWriter",
    "TruthMetricsHandler",
    "TRUTH_KEYS",
    "TRUTH_METRIC_NAMES",
    "render_mode_frequencies",
    "GenerationCurveHandler",
    "SampleGridHandler",
    "render_sample_grid",
    # tracking
    "ProvenanceHandler",
    "MLflowMetricsLogger",
    "GuardedMLFlowHandler",
    "default_run_name",
    "LossTerms",
    # training
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "atomic_save",
    "RequiredCheckpointLoader",
    "ResumableCheckpointer",
    "latest_checkpoint",
    "GradientClipping",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
]
