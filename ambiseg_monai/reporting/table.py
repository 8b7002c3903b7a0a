"""The comparison table: metrics per method and number of samples, mean ± std over runs.

The values are the runs' final evaluation metrics (``evaluate.json``) or, when no selected run has any,
the best validation metrics the training runs logged (see :func:`comparison_frame`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import mlflow
import pandas as pd
from mlflow.entities import Run

from ambiseg_monai.reporting import naming
from ambiseg_monai.reporting.runs import group_label

__all__ = [
    "FINAL_EVALUATION",
    "BEST_VALIDATION",
    "evaluation_frame",
    "validation_frame",
    "comparison_frame",
    "comparison_table",
    "table_to_markdown",
    "table_to_csv",
    "format_mean_std",
]

#: Where the compared values come from (the ``source`` of :func:`comparison_frame`).
FINAL_EVALUATION = "final evaluation"
BEST_VALIDATION = "best validation"

_RUN_COLUMNS = ["method", "experiment", "run_name", "run_id", "num_samples"]
#: per-run columns that are not metrics (``epoch``: the best validation epoch of a training run)
_NON_METRIC_COLUMNS = [*_RUN_COLUMNS, "epoch"]


def _run_identity(run: Run, method: str | None, names: Mapping[str, str]) -> dict:
    """The identifying columns of a run's rows: method (its group label), experiment, run name and id."""
    return {
        "method": method,
        "experiment": names.get(run.info.experiment_id, run.info.experiment_id),
        "run_name": run.info.run_name,
        "run_id": run.info.run_id,
    }


def evaluation_frame(
    runs: Sequence[Run],
    names: Mapping[str, str],
    group_by: str = "experiment",
    metrics: Sequence[str] = naming.REPORT_METRICS,
    sample_counts: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per (run, number of samples) with the run's final evaluation metrics.

    Reads run metrics ``test_n<N>_<metric>`` (see :mod:`naming`); runs without any are left out
    (e.g. a training run whose evaluation was logged to a separate run).

    Args:
        runs: the selected runs.
        names: experiment id -> name.
        group_by: how runs are labelled by method (:func:`runs.group_label`).
        metrics: metric names to keep.
        sample_counts: numbers of samples to keep; default all found.

    Returns:
        columns ``method, experiment, run_name, run_id, num_samples`` then one per metric (NaN where a
        run did not log that metric).
    """
    rows = []
    for run in runs:
        by_count: dict[int, dict[str, float]] = {}
        for key, value in run.data.metrics.items():
            parsed = naming.parse_evaluation_metric_key(key)
            if parsed and parsed[0] in metrics and (sample_counts is None or parsed[1] in sample_counts):
                by_count.setdefault(parsed[1], {})[parsed[0]] = value
        label = group_label(run, group_by, names) if by_count else None
        for num_samples, values in sorted(by_count.items()):
            rows.append({**_run_identity(run, label, names), "num_samples": num_samples, **values})
    frame = pd.DataFrame(rows, columns=_RUN_COLUMNS + list(metrics))
    return frame.dropna(axis=1, how="all").astype({"num_samples": int}) if rows else frame


def validation_frame(
    client: mlflow.MlflowClient,
    runs: Sequence[Run],
    names: Mapping[str, str],
    group_by: str = "experiment",
    metrics: Sequence[str] = naming.REPORT_METRICS,
    sample_counts: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per training run with its validation metrics at its best validation epoch.

    Reads the bare-named validation metrics (``ged``, step = epoch) and the ``num_val_samples`` parameter of
    training runs (see :mod:`naming`). The best epoch is chosen by one criterion for every run, the first
    metric of ``metrics`` any run logged (GED by default: its lowest value; ties: the earliest epoch), so
    each run contributes the values of one epoch rather than each metric's best over different epochs.
    Runs that did not log the criterion, or have no integer ``num_val_samples`` parameter, are left out.

    Args:
        client: store client (the metric histories are read through it).
        runs, names, group_by, metrics, sample_counts: as for :func:`evaluation_frame`.

    Returns:
        columns ``method, experiment, run_name, run_id, num_samples, epoch`` then one per metric (NaN where
        a run did not log that metric at its best epoch); empty when no run qualifies.
    """
    logged = [m for m in metrics if any(m in run.data.metrics for run in runs)]
    columns = [*_RUN_COLUMNS, "epoch", *metrics]
    if not logged:
        return pd.DataFrame([], columns=columns)
    criterion = logged[0]
    rows = []
    for run in runs:
        num_samples = run.data.params.get(naming.VALIDATION_SAMPLES_PARAM, "")
        if criterion not in run.data.metrics or not num_samples.isdigit():
            continue  # not a training run that validated with a known number of samples
        if sample_counts is not None and int(num_samples) not in sample_counts:
            continue
        history = {m: client.get_metric_history(run.info.run_id, m) for m in logged if m in run.data.metrics}
        scores = sorted((m for m in history[criterion] if math.isfinite(m.value)), key=lambda m: m.step)
        if not scores:
            continue
        pick = min if criterion in naming.LOWER_IS_BETTER else max
        best_epoch = pick(scores, key=lambda m: m.value).step  # min/max keep the first (earliest) of ties
        values = {m: next((x.value for x in h if x.step == best_epoch), math.nan) for m, h in history.items()}
        rows.append(
            {
                **_run_identity(run, group_label(run, group_by, names), names),
                "num_samples": int(num_samples),
                "epoch": best_epoch,
                **values,
            }
        )
    frame = pd.DataFrame(rows, columns=columns)
    return frame.dropna(axis=1, how="all") if rows else frame


def comparison_frame(
    client: mlflow.MlflowClient,
    runs: Sequence[Run],
    names: Mapping[str, str],
    group_by: str = "experiment",
    metrics: Sequence[str] = naming.REPORT_METRICS,
    sample_counts: Sequence[int] | None = None,
) -> tuple[pd.DataFrame, str]:
    """The per-run values to compare and their source.

    The final evaluation metrics (:func:`evaluation_frame`, source :data:`FINAL_EVALUATION`) when any selected
    run has them; otherwise the training runs' best validation metrics (:func:`validation_frame`, source
    :data:`BEST_VALIDATION`), so that runs can be compared right after training. The two are never mixed:
    validation and test values are not comparable.

    Raises:
        ValueError: no selected run has either kind of metrics (the message says what was looked for).
    """
    frame = evaluation_frame(runs, names, group_by, metrics, sample_counts)
    if not frame.empty:
        return frame, FINAL_EVALUATION
    frame = validation_frame(client, runs, names, group_by, metrics, sample_counts)
    if not frame.empty:
        return frame, BEST_VALIDATION
    samples = f" with {list(sample_counts)} samples per image" if sample_counts is not None else ""
    raise ValueError(
        f"the selected runs have no final evaluation metrics {list(metrics)} (run metrics named like "
        f"{naming.evaluation_metric_key(metrics[0] if metrics else 'ged', 16)!r}) and no validation metrics "
        f"of a training run{samples} (named like {metrics[0] if metrics else 'ged'!r}, with a "
        f"{naming.VALIDATION_SAMPLES_PARAM!r} parameter); train a bundle, then run its evaluate.json for "
        "final test metrics."
    )


def comparison_table(frame: pd.DataFrame, metrics: Sequence[str] = naming.REPORT_METRICS) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1; NaN for a single run) over runs.

    Args:
        frame: output of :func:`evaluation_frame` or :func:`validation_frame`.
        metrics: metric columns to summarise (those absent from ``frame`` are skipped).

    Returns:
        one row per (method, num_samples), sorted; columns ``method, num_samples, n_runs`` then
        ``<metric>_mean, <metric>_std`` for each metric.
    """
    if frame.empty:
        raise ValueError(
            f"the selected runs have no final evaluation metrics {list(metrics)} (run metrics named like "
            f"{naming.evaluation_metric_key(metrics[0] if metrics else 'ged', 16)!r}); "
            "run the bundle's evaluate.json first."
        )
    present = [m for m in metrics if m in frame.columns]
    if not present:
        found = [c for c in frame.columns if c not in _NON_METRIC_COLUMNS]
        raise ValueError(f"the selected runs logged none of the metrics {list(metrics)}; they have {found}.")
    grouped = frame.groupby(["method", "num_samples"], sort=True)
    table = grouped["run_id"].nunique().rename("n_runs").to_frame()
    for metric in present:
        table[f"{metric}_mean"] = grouped[metric].mean()
        table[f"{metric}_std"] = grouped[metric].std(ddof=1)
    return table.reset_index()


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``0.123 ± 0.004``; the mean alone when the std is undefined (one run); ``–`` when there is no value."""
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_to_markdown(table: pd.DataFrame, metrics: Sequence[str] = naming.REPORT_METRICS, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; the best mean of each metric at each N is in bold.

    Column headers carry ↓ (lower is better: GED) or ↑ (higher is better).
    """
    present = [m for m in metrics if f"{m}_mean" in table.columns]
    header = ["Method", "N", "Runs"] + [
        f"{naming.metric_label(m)} {'↓' if m in naming.LOWER_IS_BETTER else '↑'}" for m in present
    ]
    best: dict[tuple[int, str], float] = {}
    for num_samples, part in table.groupby("num_samples"):
        for m in present:
            column = part[f"{m}_mean"].dropna()
            if len(column) > 1:
                best[(num_samples, m)] = column.min() if m in naming.LOWER_IS_BETTER else column.max()
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + [":---:"] * len(present)) + "|"]
    for _, row in table.iterrows():
        cells = [str(row["method"]), str(int(row["num_samples"])), str(int(row["n_runs"]))]
        for m in present:
            text = format_mean_std(row[f"{m}_mean"], row[f"{m}_std"], digits)
            if best.get((row["num_samples"], m)) == row[f"{m}_mean"]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_to_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the table as CSV (full precision; an undefined std is an empty cell)."""
    table.to_csv(path, index=False)
