"""Names shared by everything that writes to, or reads from, the MLflow store.

The bundles log under these names and ``ambiseg compare`` reads them back, so this module is the
single place where the convention is written down (docs/comparison.md repeats it for users).

Evaluation metrics
    A final evaluation (``evaluate.json``) logs, for every metric and every number of samples N
    drawn per image, the mean over the test images as the run metric ``test_n<N>_<metric>``
    (e.g. ``test_n16_ged``; ``MLflowMetricsLogger(prefix="test_n16_")``). ``<metric>`` is a name of
    :data:`ambiseg_monai.metrics.METRIC_NAMES`.
Validation metrics (training runs)
    A training run logs its validation metrics under the bare metric name (``ged``), once per
    validation, at step = the trainer's epoch; each validation draws ``num_val_samples`` (a run
    parameter) samples per image from the validation split. The loss, its terms and the learning rate
    are logged at every iteration (step = iteration; the loss as ``loss``, or as the handler's
    ``tag_name``, ``train_loss``, when the trainer's output is a single number). ``ambiseg compare``
    falls back to these when no selected run has evaluation metrics.
Per-image tables
    The per-image values are logged as CSV artifacts ``n<N>_per_image.csv`` (``PerImageMetricsWriter``
    with prefix ``n<N>_``, at the artifact root or in a folder) with a ``case_id`` column and one
    column per metric. ``per_image_n<N>.csv`` names and a single CSV with a ``num_samples`` column
    are read as well.
Tags
    ``ambiseg.*`` tags (below) say which bundle, dataset and code produced a run.
"""

from __future__ import annotations

import re

__all__ = [
    "EVALUATION_PREFIX",
    "VALIDATION_SAMPLES_PARAM",
    "TRAINING_LOSS_KEYS",
    "REPORT_METRICS",
    "DEFAULT_SAMPLE_COUNTS",
    "LOWER_IS_BETTER",
    "METRIC_LABELS",
    "TAG_BUNDLE",
    "TAG_DATASET",
    "TAG_DATALIST_SHA256",
    "TAG_CODE_VERSION",
    "TAG_GIT_DESCRIBE",
    "TAG_RUN_KIND",
    "TAG_COMPARED_RUNS",
    "TAG_SYNCED_FROM",
    "TAG_EXPERIMENT_KIND",
    "EXPERIMENT_KIND",
    "RUN_KINDS",
    "COMPARISON_EXPERIMENT",
    "PER_IMAGE_ARTIFACT_DIR",
    "CONFIG_ARTIFACT_DIR",
    "EXECUTED_CONFIG_NAME",
    "evaluation_metric_key",
    "parse_evaluation_metric_key",
    "per_image_csv_name",
    "parse_per_image_csv_name",
    "metric_label",
]

EVALUATION_PREFIX = "test"
#: Run parameter of a training run: samples drawn per image at each validation.
VALIDATION_SAMPLES_PARAM = "num_val_samples"
#: Metric keys of a training run's per-iteration loss (the first one a run has is its loss); ``Loss`` is
#: the name MONAI's ``MLFlowHandler`` gives a single-number loss by default.
TRAINING_LOSS_KEYS = ("loss", "train_loss", "Loss")
#: Metrics in the comparison table, in column order (GED, CI and its parts, soft Dice, HM-IoU).
REPORT_METRICS = (
    "ged",
    "ci",
    "combined_sensitivity",
    "dmax",
    "diversity_agreement",
    "soft_dice",
    "hm_iou",
)
#: Numbers of samples per image the evaluation bundles draw.
DEFAULT_SAMPLE_COUNTS = (4, 16)
#: Metrics where a smaller value is better (every other metric: larger is better).
LOWER_IS_BETTER = frozenset({"ged"})
METRIC_LABELS = {
    "ged": "GED",
    "ci": "CI",
    "combined_sensitivity": "S_c",
    "dmax": "D_max",
    "diversity_agreement": "D_a",
    "soft_dice": "soft Dice",
    "hm_iou": "HM-IoU",
    "sample_diversity": "sample diversity",
    "cross_pair_dice": "cross-pair Dice",
    "cross_pair_iou": "cross-pair IoU",
    "s_ncc": "S_NCC",
}

TAG_BUNDLE = "ambiseg.bundle"
TAG_DATASET = "ambiseg.dataset"
TAG_DATALIST_SHA256 = "ambiseg.datalist_sha256"
TAG_CODE_VERSION = "ambiseg.code_version"
TAG_GIT_DESCRIBE = "ambiseg.git_describe"
TAG_RUN_KIND = "ambiseg.run_kind"
TAG_COMPARED_RUNS = "ambiseg.compared_runs"
TAG_SYNCED_FROM = "ambiseg.synced_from"
#: MLflow 3's experiment kind (its ``ExperimentKind``): ``custom_model_development`` marks a model-training
#: experiment (runs, metrics, models), ``genai_development`` a GenAI one (traces); MLflow's tools and the UI's
#: kind selector read it. Set on the experiments the bundles and ``ambiseg compare`` create. (MLflow 3.17's UI
#: picks its view with its own GenAI / Model training switch instead; see docs/comparison.md.)
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUN_KINDS = ("training", "evaluation", "inference", "comparison")

COMPARISON_EXPERIMENT = "ambiseg_comparisons"
#: Artifact folder of per-image CSVs logged by :func:`provenance.log_evaluation_results` (None: the root,
#: where ``evaluate.json``'s ``MLFlowHandler(artifacts=@eval_dir)`` puts them).
PER_IMAGE_ARTIFACT_DIR: str | None = None
CONFIG_ARTIFACT_DIR = "config"
EXECUTED_CONFIG_NAME = "executed_config.json"

_METRIC_KEY = re.compile(r"^(?P<prefix>[A-Za-z]+)_n(?P<n>\d+)_(?P<metric>[a-z0-9_]+)$")
_PER_IMAGE_NAMES = (
    re.compile(r"(?:^|/)n(?P<n>\d+)_per_image\.csv$", re.IGNORECASE),
    re.compile(r"per_image_n(?P<n>\d+)\.csv$", re.IGNORECASE),
)


def evaluation_metric_key(metric: str, num_samples: int, prefix: str = EVALUATION_PREFIX) -> str:
    """The MLflow metric key of ``metric`` evaluated with ``num_samples`` samples: ``test_n16_ged``."""
    if not metric or not re.fullmatch(r"[a-z0-9_]+", metric):
        raise ValueError(f"metric name {metric!r}: use lower-case letters, digits and underscores.")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    return f"{prefix}_n{int(num_samples)}_{metric}"


def parse_evaluation_metric_key(key: str, prefix: str = EVALUATION_PREFIX) -> tuple[str, int] | None:
    """``(metric, num_samples)`` of a key written by :func:`evaluation_metric_key`; None for other keys."""
    match = _METRIC_KEY.match(key)
    if match is None or match["prefix"] != prefix:
        return None
    return match["metric"], int(match["n"])


def per_image_csv_name(num_samples: int) -> str:
    """File name of the per-image table for ``num_samples`` samples: ``n16_per_image.csv``."""
    return f"n{int(num_samples)}_per_image.csv"


def parse_per_image_csv_name(name: str) -> int | None:
    """The number of samples encoded in a per-image CSV name, or None when the name does not encode one."""
    for pattern in _PER_IMAGE_NAMES:
        match = pattern.search(name)
        if match:
            return int(match["n"])
    return None


def metric_label(metric: str) -> str:
    """Human-readable label of a metric (``dmax`` -> ``D_max``)."""
    return METRIC_LABELS.get(metric, metric)
