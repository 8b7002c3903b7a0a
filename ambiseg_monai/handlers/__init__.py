"""Ignite handlers: the metric handler, per-image tables and sample writers, MLflow tracking (provenance,
prefixed metrics, a failure-tolerant ``MLFlowHandler``), loss-term logging, checkpoints, guards, PNG grids,
progress (epoch lines, progress bar, phase labels, the summaries of a training, an evaluation, an inference)."""

import ambiseg_monai.handlers.checkpoint as _checkpoint
import ambiseg_monai.handlers.generation_curve as _generation_curve
import ambiseg_monai.handlers.gradient_clipping as _gradient_clipping
import ambiseg_monai.handlers.loss_terms as _loss_terms
import ambiseg_monai.handlers.metrics as _metrics
import ambiseg_monai.handlers.mlflow_logging as _mlflow_logging
import ambiseg_monai.handlers.nonfinite as _nonfinite
import ambiseg_monai.handlers.progress as _progress
import ambiseg_monai.handlers.result_writers as _result_writers
import ambiseg_monai.handlers.sample_images as _sample_images
import ambiseg_monai.handlers.truth as _truth
from ambiseg_monai.handlers.checkpoint import *  # noqa: F403
from ambiseg_monai.handlers.generation_curve import *  # noqa: F403
from ambiseg_monai.handlers.gradient_clipping import *  # noqa: F403
from ambiseg_monai.handlers.loss_terms import *  # noqa: F403
from ambiseg_monai.handlers.metrics import *  # noqa: F403
from ambiseg_monai.handlers.mlflow_logging import *  # noqa: F403
from ambiseg_monai.handlers.nonfinite import *  # noqa: F403
from ambiseg_monai.handlers.progress import *  # noqa: F403
from ambiseg_monai.handlers.result_writers import *  # noqa: F403
from ambiseg_monai.handlers.sample_images import *  # noqa: F403
from ambiseg_monai.handlers.truth import *  # noqa: F403

__all__ = [
    *_checkpoint.__all__,
    *_generation_curve.__all__,
    *_gradient_clipping.__all__,
    *_loss_terms.__all__,
    *_metrics.__all__,
    *_mlflow_logging.__all__,
    *_nonfinite.__all__,
    *_progress.__all__,
    *_result_writers.__all__,
    *_sample_images.__all__,
    *_truth.__all__,
]
