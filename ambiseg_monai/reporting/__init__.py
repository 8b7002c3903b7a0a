"""Experiment tracking and comparison: provenance and parameters logged with every run (the MLflow side of
:class:`ambiseg_monai.handlers.ProvenanceHandler`), the trained model as an MLflow model (:mod:`.mlflow_model`,
logged by :class:`ambiseg_monai.handlers.MLflowModelLogger`), the MLflow store fallback, and the comparison report
(``ambiseg compare``). See docs/comparison.md, docs/deploy.md and :mod:`.naming`.

Importing runs from one store into another: :mod:`ambiseg_monai.reporting.sync`
(``python -m ambiseg_monai.reporting.sync``)."""

import ambiseg_monai.reporting.compare as _compare
import ambiseg_monai.reporting.mlflow_model as _mlflow_model
import ambiseg_monai.reporting.naming as _naming
import ambiseg_monai.reporting.plots as _plots
import ambiseg_monai.reporting.provenance as _provenance
import ambiseg_monai.reporting.report as _report
import ambiseg_monai.reporting.runs as _runs
import ambiseg_monai.reporting.sync as _sync
import ambiseg_monai.reporting.table as _table
import ambiseg_monai.reporting.tracking as _tracking
from ambiseg_monai.reporting.compare import *  # noqa: F403
from ambiseg_monai.reporting.mlflow_model import *  # noqa: F403
from ambiseg_monai.reporting.naming import *  # noqa: F403
from ambiseg_monai.reporting.plots import *  # noqa: F403
from ambiseg_monai.reporting.provenance import *  # noqa: F403
from ambiseg_monai.reporting.report import *  # noqa: F403
from ambiseg_monai.reporting.runs import *  # noqa: F403
from ambiseg_monai.reporting.sync import *  # noqa: F403
from ambiseg_monai.reporting.table import *  # noqa: F403
from ambiseg_monai.reporting.tracking import *  # noqa: F403

__all__ = [
    *_compare.__all__,
    *_mlflow_model.__all__,
    *_naming.__all__,
    *_plots.__all__,
    *_provenance.__all__,
    *_report.__all__,
    *_runs.__all__,
    *_sync.__all__,
    *_table.__all__,
    *_tracking.__all__,
]
