"""Compare runs of a shared MLflow store: table (Markdown + CSV), plots (PNG), logged as a comparison run.

>>> report = compare_runs("sqlite:///mlruns.db", RunSelection(dataset="demo"), out_dir="comparison")
>>> print(report.markdown)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric, Run

from ambiseg_monai.metrics.suite import METRIC_NAMES
from ambiseg_monai.reporting import naming
from ambiseg_monai.reporting.plots import plot_metric_bars, plot_metric_vs_samples, plot_training_curves
from ambiseg_monai.reporting.runs import RunSelection, experiment_names, group_label, select_runs
from ambiseg_monai.reporting.table import (
    BEST_VALIDATION,
    FINAL_EVALUATION,
    comparison_frame,
    comparison_table,
    table_to_csv,
    table_to_markdown,
)
from ambiseg_monai.reporting.tracking import sqlite_uri_path

__all__ = [
    "ComparisonReport",
    "compare_runs",
    "training_curves",
    "step_units",
    "load_per_image_metrics",
    "open_store",
]

#: Report file names inside the output folder (and the ``report/`` artifact folder of the comparison run).
REPORT_FILES = {
    "markdown": "comparison.md",
    "table_csv": "comparison.csv",
    "runs_csv": "runs.csv",
    "bars": "metrics_bar.png",
    "vs_samples": "metrics_vs_samples.png",
    "curves": "training_curves.png",
}


@dataclass
class ComparisonReport:
    """What :func:`compare_runs` produced.

    Attributes:
        table: one row per (method, N): ``n_runs``, ``<metric>_mean``, ``<metric>_std`` (and ``source`` when
            the values are best validation metrics).
        runs: the per-run values the table summarises (one row per run and N).
        curves: training-curve points (``method, run_name, run_id, key, unit, step, value``).
        markdown: the Markdown report text.
        files: report part -> written file.
        comparison_run_id: the MLflow run holding the report, when it was logged.
        source: where the values come from: :data:`~.table.FINAL_EVALUATION` or :data:`~.table.BEST_VALIDATION`.
    """

    table: pd.DataFrame
    runs: pd.DataFrame
    curves: pd.DataFrame
    markdown: str
    files: dict[str, Path] = field(default_factory=dict)
    comparison_run_id: str | None = None
    source: str = FINAL_EVALUATION


def open_store(tracking_uri: str) -> mlflow.MlflowClient:
    """A client on an existing store (a missing SQLite file is an error, not a new empty store)."""
    database = sqlite_uri_path(tracking_uri)
    if database is not None and not database.is_file():
        raise FileNotFoundError(f"no MLflow store at {database} (tracking URI {tracking_uri}).")
    return mlflow.MlflowClient(tracking_uri)


def step_units(histories: dict[str, list[Metric]]) -> dict[str, str]:
    """The unit of the steps of each of one run's metric keys: ``iteration``, ``epoch`` or ``step``.

    MONAI's ``MLFlowHandler`` logs the trainer's values (the loss, its terms, the learning rate) at every
    iteration, step = iteration, and the validator's metrics once per validation, step = epoch (see
    :mod:`naming`). So a key logged at exactly the steps of the run's loss is per-iteration and any other key
    per-epoch. A run without a loss (e.g. an evaluation) has no iterations: its keys are in plain ``step``.

    Args:
        histories: metric key -> its logged history (``MlflowClient.get_metric_history``), including the
            loss key (:data:`naming.TRAINING_LOSS_KEYS`) when the run has one.
    """
    loss = next((histories[k] for k in naming.TRAINING_LOSS_KEYS if k in histories), None)
    if loss is None:
        return dict.fromkeys(histories, "step")
    iterations = {m.step for m in loss}
    return {key: "iteration" if {m.step for m in h} == iterations else "epoch" for key, h in histories.items()}


def training_curves(
    client: mlflow.MlflowClient,
    runs: Sequence[Run],
    names: dict[str, str],
    group_by: str = "experiment",
    keys: Sequence[str] | None = None,
    max_keys: int = 6,
) -> pd.DataFrame:
    """Metric histories of the runs, for the training-curves plot.

    Args:
        client: store client.
        runs: selected runs.
        names: experiment id -> name.
        group_by: method labelling (as for the table).
        keys: metric keys to fetch; default: every key with more than one logged step in some run
            (evaluation summaries ``test_n*_*`` excluded), at most ``max_keys``: losses first, then
            GED, CI, soft Dice, HM-IoU, the CI parts, then the others.
        max_keys: cap on automatically chosen keys.

    Returns:
        long table ``method, run_name, run_id, key, unit, step, value`` (empty when nothing has a history);
        ``unit`` is what ``step`` counts: ``iteration``, ``epoch`` or ``step`` (:func:`step_units`).
    """
    histories: dict[str, dict[str, list[Metric]]] = {}  # run id -> key -> history
    for run in runs:
        candidates = (
            keys if keys is not None else [k for k in run.data.metrics if not naming.parse_evaluation_metric_key(k)]
        )
        # the loss history tells iterations from epochs (step_units), whether it is plotted or not
        wanted = [*candidates, *naming.TRAINING_LOSS_KEYS]
        histories[run.info.run_id] = {
            key: client.get_metric_history(run.info.run_id, key)
            for key in dict.fromkeys(wanted)
            if key in run.data.metrics
        }
    if keys is None:
        multi = {key for h in histories.values() for key, history in h.items() if len({m.step for m in history}) > 1}
        keys = sorted(sorted(multi), key=_curve_priority)[:max_keys]
    by_id = {run.info.run_id: run for run in runs}
    rows = []
    for run_id, run_histories in histories.items():
        units = step_units(run_histories)
        method = group_label(by_id[run_id], group_by, names)
        for key, history in run_histories.items():
            if key in keys:
                rows += [
                    {
                        "method": method,
                        "run_name": by_id[run_id].info.run_name,
                        "run_id": run_id,
                        "key": key,
                        "unit": units[key],
                        "step": m.step,
                        "value": m.value,
                    }
                    for m in history
                ]
    curves = pd.DataFrame(rows, columns=["method", "run_name", "run_id", "key", "unit", "step", "value"])
    order = {k: i for i, k in enumerate(keys)}
    return curves.sort_values(
        ["key", "method", "run_id", "step"], key=lambda s: s.map(order) if s.name == "key" else s
    ).reset_index(drop=True)


# Automatic training-curve panels: losses first, then the headline validation metrics, then the rest.
_CURVE_METRIC_ORDER = (
    "ged",
    "ci",
    "soft_dice",
    "hm_iou",
    "combined_sensitivity",
    "dmax",
    "diversity_agreement",
)


def _curve_priority(key: str) -> tuple:
    if key.lower() in ("loss", "train_loss"):
        return (0, 0, key)
    if "loss" in key.lower():
        return (0, 1, key)
    metric = key.split("_", 1)[1] if key.startswith(("val_", "validation_")) else key
    if metric in _CURVE_METRIC_ORDER:
        return (1, _CURVE_METRIC_ORDER.index(metric), key)
    return (3 if key.startswith("lr_") else 2, 0, key)  # the learning rate last


def load_per_image_metrics(client: mlflow.MlflowClient, run_id: str) -> pd.DataFrame:
    """The per-image evaluation tables a run logged, stacked by increasing N (each table's row order
    kept): columns ``num_samples, case_id, <metrics>``.

    Reads CSV artifacts named ``n<N>_per_image.csv`` or ``per_image_n<N>.csv`` (at the root or up to
    two folders deep), or ``*per_image*.csv`` files with a ``num_samples`` column.
    """
    found: list[str] = []
    folders = [""]
    for depth in range(3):
        next_folders = []
        for folder in folders:
            for info in client.list_artifacts(run_id, folder or None):
                if info.is_dir and depth < 2:
                    next_folders.append(info.path)
                elif info.path.lower().endswith(".csv") and "per_image" in Path(info.path).name.lower():
                    found.append(info.path)
        folders = next_folders
    if not found:
        raise FileNotFoundError(
            f"run {run_id} has no per-image CSV artifact (expected e.g. {naming.per_image_csv_name(16)})."
        )
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in sorted(found):
            frame = pd.read_csv(client.download_artifacts(run_id, artifact, tmp))
            if "num_samples" not in frame.columns:
                count = naming.parse_per_image_csv_name(artifact)
                if count is None:
                    raise ValueError(
                        f"run {run_id}: {artifact} has neither a num_samples column nor _n<N> in its name."
                    )
                frame.insert(0, "num_samples", count)
            frames.append(frame)
    stacked = pd.concat(frames, ignore_index=True)
    return stacked.sort_values("num_samples", kind="stable", ignore_index=True)


#: The ``source`` column of both CSVs of a report built from validation metrics.
VALIDATION_SOURCE_LABEL = f"{BEST_VALIDATION} (training run)"
#: Plot titles per source, so that a PNG seen on its own (e.g. in the MLflow UI) says what it shows.
_PLOT_TITLES = {
    FINAL_EVALUATION: "Final evaluation metrics (evaluate.json)",
    BEST_VALIDATION: "Best validation metrics of the training runs (run evaluate.json for final test metrics)",
}


def _source_lines(source: str, frame: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """The report's paragraphs on where the values come from (printed by ``ambiseg compare`` too)."""
    legend = "↓ lower is better, ↑ higher is better; best mean per N in bold."
    if source == FINAL_EVALUATION:
        return [
            "Final evaluation metrics, mean ± sample standard deviation over runs "
            f"(each run's value is its mean over test images); N = samples drawn per image; {legend}"
        ]
    counts = ", ".join(str(n) for n in sorted(frame["num_samples"].unique()))
    criterion = next(m for m in metrics if m in frame.columns)  # the metric validation_frame ranked epochs by
    return [
        f"> **Source: best validation (training runs, validation split, N = {counts} samples per image)** — "
        "run each bundle's `evaluate.json` for final test metrics.",
        "",
        "No selected run has final evaluation metrics, so each training run contributes the validation "
        f"metrics of its epoch with the best {naming.metric_label(criterion)} (see Runs); mean ± sample "
        "standard deviation over runs (each run's value is its mean over the validation images); "
        f"N = samples drawn per image at validation; {legend}",
    ]


def _markdown_report(
    title: str,
    table: pd.DataFrame,
    frame: pd.DataFrame,
    source: str,
    metrics: Sequence[str],
    selection: RunSelection,
    tracking_uri: str,
    images: dict[str, Path],
) -> str:
    lines = [
        f"# {title}",
        "",
        f"Store: `{tracking_uri}` · selection: " + "; ".join(f"{k} = {v}" for k, v in selection.describe().items()),
        "",
        *_source_lines(source, frame, metrics),
        "",
        table_to_markdown(table, metrics),
    ]
    captions = {
        "bars": "Metrics per method",
        "vs_samples": "Metrics against the number of samples",
        "curves": "Training curves",
    }
    for part, path in images.items():
        lines += [f"## {captions[part]}", "", f"![{captions[part]}]({path.name})", ""]
    best_epoch = "epoch" in frame.columns  # validation values: say which epoch each run contributed
    lines += [
        "## Runs",
        "",
        "| Method | Run | Run id | N |" + (" Best epoch |" if best_epoch else ""),
        "|---|---|---|---|" + ("---|" if best_epoch else ""),
    ]
    for (method, run_name, run_id), part in frame.groupby(["method", "run_name", "run_id"], sort=False):
        counts = ", ".join(str(n) for n in sorted(part["num_samples"]))
        epoch = f" {int(part['epoch'].iloc[0])} |" if best_epoch else ""
        lines.append(f"| {method} | {run_name} | `{run_id}` | {counts} |{epoch}")
    return "\n".join(lines) + "\n"


def _comparison_experiment_id(client: mlflow.MlflowClient, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    database = sqlite_uri_path(tracking_uri)
    # like MONAI's MLFlowHandler: artifacts of a local SQLite store live in <db folder>/mlruns
    location = (database.resolve().parent / "mlruns").as_uri() if database is not None else None
    # a model-training experiment for MLflow 3, as the bundles' experiments (naming.TAG_EXPERIMENT_KIND)
    tags = {naming.TAG_EXPERIMENT_KIND: naming.EXPERIMENT_KIND}
    return client.create_experiment(name, artifact_location=location, tags=tags)


def compare_runs(
    tracking_uri: str,
    selection: RunSelection = RunSelection(),
    out_dir: str | os.PathLike = "comparison",
    group_by: str = "experiment",
    metrics: Sequence[str] = naming.REPORT_METRICS,
    sample_counts: Sequence[int] | None = None,
    curve_keys: Sequence[str] | None = None,
    log_to_mlflow: bool = True,
    comparison_experiment: str = naming.COMPARISON_EXPERIMENT,
    title: str = "Method comparison",
) -> ComparisonReport:
    """Build the comparison report of the selected runs and (by default) log it to MLflow.

    The values are the runs' final evaluation metrics or, when no selected run has any (right after
    training), the training runs' best validation metrics, labelled as such (:func:`.table.comparison_frame`).

    Args:
        tracking_uri: the shared store (``sqlite:///...`` or ``http://host:port``).
        selection: which runs (see :class:`RunSelection`).
        out_dir: folder for ``comparison.md``, ``comparison.csv``, ``runs.csv`` and the PNG plots.
        group_by: method label of a run: ``experiment`` (default), ``run``, ``tag:<key>``, ``param:<key>``.
        metrics: metrics in the table and plots (default GED, CI, S_c, D_max, D_a, soft Dice, HM-IoU).
        sample_counts: numbers of samples to include; default all found.
        curve_keys: metric keys for the training curves; default chosen automatically.
        log_to_mlflow: log the report as artifacts (``report/``) of a new run in ``comparison_experiment``.
        comparison_experiment: experiment holding comparison runs (never itself compared by default).
        title: report heading.
    """
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or not metrics:
        raise ValueError(f"unknown metric names {unknown} (or none given); choose from {METRIC_NAMES}.")
    client = open_store(tracking_uri)
    names = experiment_names(client)
    runs = select_runs(client, selection, comparison_experiment)
    frame, source = comparison_frame(client, runs, names, group_by, metrics, sample_counts)
    table = comparison_table(frame, metrics)
    if source == BEST_VALIDATION:
        # label every row of both CSVs: validation values must not pass for test results
        for part in (table, frame):
            part.insert(1, "source", VALIDATION_SOURCE_LABEL)
    curves = training_curves(client, runs, names, group_by, curve_keys)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"table_csv": out_dir / REPORT_FILES["table_csv"], "runs_csv": out_dir / REPORT_FILES["runs_csv"]}
    table_to_csv(table, files["table_csv"])
    frame.to_csv(files["runs_csv"], index=False)
    images = {
        "bars": plot_metric_bars(table, out_dir / REPORT_FILES["bars"], metrics, _PLOT_TITLES[source]),
        "vs_samples": plot_metric_vs_samples(
            table, out_dir / REPORT_FILES["vs_samples"], metrics, _PLOT_TITLES[source]
        ),
    }
    if not curves.empty:
        images["curves"] = plot_training_curves(curves, out_dir / REPORT_FILES["curves"])
    markdown = _markdown_report(title, table, frame, source, metrics, selection, tracking_uri, images)
    files["markdown"] = out_dir / REPORT_FILES["markdown"]
    files["markdown"].write_text(markdown, encoding="utf-8")
    files.update(images)
    report = ComparisonReport(table, frame, curves, markdown, files, source=source)
    if log_to_mlflow:
        report.comparison_run_id = _log_report(client, tracking_uri, comparison_experiment, report, selection, runs)
    return report


def _log_report(
    client: mlflow.MlflowClient,
    tracking_uri: str,
    experiment: str,
    report: ComparisonReport,
    selection: RunSelection,
    runs: Sequence[Run],
) -> str:
    from ambiseg_monai.reporting.provenance import code_version

    experiment_id = _comparison_experiment_id(client, experiment, tracking_uri)
    run_ids = [r.info.run_id for r in runs]
    tags = {
        naming.TAG_RUN_KIND: "comparison",
        naming.TAG_CODE_VERSION: code_version(),
        naming.TAG_COMPARED_RUNS: ",".join(run_ids)[:8000],
    }
    if selection.dataset:
        tags[naming.TAG_DATASET] = selection.dataset
    run = client.create_run(experiment_id, run_name=f"compare_{time.strftime('%Y%m%d_%H%M%S')}", tags=tags)
    run_id = run.info.run_id
    try:
        params = [mlflow.entities.Param(f"selection.{k}", v[:6000]) for k, v in selection.describe().items()]
        params.append(mlflow.entities.Param("source", report.source))
        client.log_batch(run_id, params=params)
        for path in report.files.values():
            client.log_artifact(run_id, str(path), "report")
        with tempfile.TemporaryDirectory() as tmp:
            listing = Path(tmp) / "compared_runs.json"
            listing.write_text(json.dumps(run_ids, indent=1) + "\n", encoding="utf-8")
            client.log_artifact(run_id, str(listing), "report")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
