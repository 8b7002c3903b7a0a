"""Experiment tracking and comparison: provenance and parameters logged with every run (the MLflow side of
:class:`ambiseg_monai.handlers.ProvenanceHandler`), the MLflow store fallback, and the comparison report
(``ambiseg compare``). See docs/comparison.md and :mod:`.naming`.

Importing runs from one store into another: :mod:`ambiseg_monai.reporting.sync`
(``python -m ambiseg_monai.reporting.sync``)."""

from ambiseg_monai.reporting.naming import (
    COMPARISON_EXPERIMENT,
    DEFAULT_SAMPLE_COUNTS,
    REPORT_METRICS,
    evaluation_metric_key,
    parse_evaluation_metric_key,
    per_image_csv_name,
)
from ambiseg_monai.reporting.provenance import (
    code_version,
    config_files_from_argv,
    datalist_sha256,
    executed_config_from_argv,
    flatten_config,
    hyperparameters,
    load_config,
    log_evaluation_results,
    log_executed_config,
    log_per_image_csv,
    log_provenance,
    provenance_tags,
    summarise_per_image,
)
from ambiseg_monai.reporting.report import ComparisonReport, compare_runs, load_per_image_metrics, training_curves
from ambiseg_monai.reporting.runs import RunSelection, select_runs
from ambiseg_monai.reporting.table import comparison_table, evaluation_frame, table_to_markdown
from ambiseg_monai.reporting.tracking import probe_tracking_uri, resolve_tracking_uri

__all__ = [
    "COMPARISON_EXPERIMENT",
    "DEFAULT_SAMPLE_COUNTS",
    "REPORT_METRICS",
    "evaluation_metric_key",
    "parse_evaluation_metric_key",
    "per_image_csv_name",
    "code_version",
    "config_files_from_argv",
    "datalist_sha256",
    "executed_config_from_argv",
    "flatten_config",
    "hyperparameters",
    "load_config",
    "log_evaluation_results",
    "log_executed_config",
    "log_per_image_csv",
    "log_provenance",
    "provenance_tags",
    "summarise_per_image",
    "ComparisonReport",
    "compare_runs",
    "load_per_image_metrics",
    "training_curves",
    "RunSelection",
    "select_runs",
    "comparison_table",
    "evaluation_frame",
    "table_to_markdown",
    "probe_tracking_uri",
    "resolve_tracking_uri",
]
