"""PNG plots of a comparison: metric bars per method, metric against number of samples, training curves.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), so plotting works
headless and does not change the caller's matplotlib backend. Each plot has a builder returning the
figure (``*_figure``, e.g. to inspect or restyle it) and a writer of its PNG (``plot_*``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ambiseg_monai.reporting import naming

__all__ = [
    "metric_bars_figure",
    "metric_vs_samples_figure",
    "training_curves_figure",
    "plot_metric_bars",
    "plot_metric_vs_samples",
    "plot_training_curves",
]

_DPI = 110


def _grid(num_panels: int, max_cols: int = 4, panel_size: tuple[float, float] = (3.6, 3.0)):
    cols = min(num_panels, max_cols)
    rows = math.ceil(num_panels / cols)
    figure = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows + 0.6), dpi=_DPI)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for axis in axes[num_panels:]:
        axis.set_visible(False)
    return figure, axes[:num_panels]


def _title(metric: str) -> str:
    return f"{naming.metric_label(metric)} ({'lower' if metric in naming.LOWER_IS_BETTER else 'higher'} is better)"


def _present(table: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    present = [m for m in metrics if f"{m}_mean" in table.columns and table[f"{m}_mean"].notna().any()]
    if not present:
        raise ValueError(f"the table has none of the metrics {list(metrics)}.")
    return present


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _finish(figure: Figure, suptitle: str | None, legend_rows: float, **legend: object) -> None:
    """Put the title and the legend above the panels and lay the panels out below them.

    Title and legend get fixed heights in inches (the figure grows by the title's), so they neither
    overlap the panels nor leave a gap, whatever the number of panel rows.

    Args:
        figure: the figure, its panels drawn.
        suptitle: figure title (None: none).
        legend_rows: height of the legend in text lines (its title counts as one).
        legend: keyword arguments of ``Figure.legend`` (handles, labels, ncol, title).
    """
    title_height = 0.3 if suptitle else 0.0
    figure.set_figheight(figure.get_figheight() + title_height)
    height = figure.get_figheight()
    if suptitle:
        figure.suptitle(suptitle, fontsize=10, y=1 - 0.06 / height, va="top")
    top = 1 - title_height / height
    figure.legend(loc="upper center", bbox_to_anchor=(0.5, top), frameon=False, **legend)
    figure.tight_layout(rect=(0, 0, 1, top - (0.05 + 0.2 * legend_rows) / height))


def metric_bars_figure(
    table: pd.DataFrame, metrics: Sequence[str] = naming.REPORT_METRICS, title: str | None = None
) -> Figure:
    """One panel per metric: a bar per method and number of samples N, error bar = std over runs.

    Args:
        table: output of :func:`table.comparison_table`.
        metrics: metrics to plot (those missing from the table are skipped).
        title: figure title (e.g. where the values come from).
    """
    present = _present(table, metrics)
    methods = list(dict.fromkeys(table["method"]))
    counts = sorted(table["num_samples"].unique())
    colours = [f"C{i}" for i in range(len(counts))]
    figure, axes = _grid(len(present))
    width = 0.8 / len(counts)
    positions = np.arange(len(methods))
    for axis, metric in zip(axes, present, strict=True):
        for i, (count, colour) in enumerate(zip(counts, colours, strict=True)):
            part = table[table["num_samples"] == count].set_index("method").reindex(methods)
            means = part[f"{metric}_mean"].to_numpy(dtype=float)
            stds = part[f"{metric}_std"].to_numpy(dtype=float)  # NaN (one run): no error bar
            axis.bar(
                positions + (i - (len(counts) - 1) / 2) * width,
                means,
                width,
                yerr=None if np.isnan(stds).all() else stds,
                color=colour,
                capsize=3,
                label=f"N = {count}",
            )
        axis.set_title(_title(metric), fontsize=10)
        axis.set_xticks(
            positions,
            methods,
            rotation=20 if len(methods) > 2 else 0,
            ha="right" if len(methods) > 2 else "center",
            fontsize=8,
        )
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    _finish(figure, title, 2, handles=handles, labels=labels, ncol=len(counts), title="samples per image")
    return figure


def plot_metric_bars(
    table: pd.DataFrame,
    path: str | os.PathLike,
    metrics: Sequence[str] = naming.REPORT_METRICS,
    title: str | None = None,
) -> Path:
    """Write :func:`metric_bars_figure` to the PNG file ``path``."""
    return _save(metric_bars_figure(table, metrics, title), path)


def metric_vs_samples_figure(
    table: pd.DataFrame, metrics: Sequence[str] = naming.REPORT_METRICS, title: str | None = None
) -> Figure:
    """One panel per metric: the metric against the number of samples N (log2 axis), a line per method,
    error bars = std over runs. Arguments as for :func:`metric_bars_figure`."""
    present = _present(table, metrics)
    methods = list(dict.fromkeys(table["method"]))
    counts = sorted(table["num_samples"].unique())
    figure, axes = _grid(len(present))
    for axis, metric in zip(axes, present, strict=True):
        for i, method in enumerate(methods):
            part = table[table["method"] == method].sort_values("num_samples")
            # a small horizontal offset per method keeps overlapping error bars apart
            dodge = 2.0 ** (0.06 * (i - (len(methods) - 1) / 2))
            stds = part[f"{metric}_std"].to_numpy(dtype=float)  # NaN (one run): no error bar
            axis.errorbar(
                part["num_samples"] * dodge,
                part[f"{metric}_mean"],
                yerr=None if np.isnan(stds).all() else stds,
                marker="o",
                capsize=3,
                color=f"C{i}",
                label=method,
            )
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.minorticks_off()
        axis.set_xlabel("samples per image N", fontsize=8)
        axis.set_title(_title(metric), fontsize=10)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    _finish(figure, title, 1, handles=handles, labels=labels, ncol=min(len(methods), 4))
    return figure


def plot_metric_vs_samples(
    table: pd.DataFrame,
    path: str | os.PathLike,
    metrics: Sequence[str] = naming.REPORT_METRICS,
    title: str | None = None,
) -> Path:
    """Write :func:`metric_vs_samples_figure` to the PNG file ``path``."""
    return _save(metric_vs_samples_figure(table, metrics, title), path)


#: Order of the training-curve panels by step unit (:func:`ambiseg_monai.reporting.report.step_units`).
_STEP_UNITS = ("iteration", "epoch", "step")


def _spans_decades(values: pd.Series) -> bool:
    """Whether ``values`` are positive and cover at least a factor of 10 (a log axis helps)."""
    return bool((values > 0).all() and values.max() >= 10 * values.min())


def training_curves_figure(curves: pd.DataFrame) -> Figure:
    """Training curves: a metric's value against its step, a line per run, coloured by method.

    Per-iteration values (the loss, its terms, the learning rate) get one panel per method, on a log
    scale when they are positive and span a decade or more: the methods optimise different objectives
    on different scales, and an early value or a spike would flatten the rest of a curve. Per-epoch
    values (the validation metrics) share one panel per key, so the methods are compared directly. Each
    panel's x axis is labelled with its unit (iteration, epoch, or step for runs without a training
    loss); per-iteration panels come first.

    Args:
        curves: long table with columns ``method, run_name, key, step, value`` and ``unit``
            (:func:`~ambiseg_monai.reporting.report.training_curves`; without ``unit``, steps are plain steps).
    """
    required = {"method", "run_name", "key", "step", "value"}
    if curves.empty or not required <= set(curves.columns):
        raise ValueError(f"training curves need a non-empty table with columns {sorted(required)}.")
    if "unit" not in curves.columns:
        curves = curves.assign(unit="step")
    keys = list(dict.fromkeys(curves["key"]))
    methods = list(dict.fromkeys(curves["method"]))
    panels: list[tuple[str, str, str | None]] = []  # (unit, key, method or None for all methods)
    for unit in _STEP_UNITS:
        for key in keys:
            part = curves[(curves["unit"] == unit) & (curves["key"] == key)]
            if part.empty:
                continue
            if unit == "iteration":
                panels += [(unit, key, method) for method in methods if (part["method"] == method).any()]
            else:
                panels.append((unit, key, None))
    figure, axes = _grid(len(panels), max_cols=3, panel_size=(4.2, 3.0))
    for axis, (unit, key, method) in zip(axes, panels, strict=True):
        part = curves[(curves["unit"] == unit) & (curves["key"] == key)]
        if method is not None:
            part = part[part["method"] == method]
        for (run_method, _run_name), run_part in part.groupby(["method", "run_name"], sort=False):
            run_part = run_part.sort_values("step")
            axis.plot(
                run_part["step"],
                run_part["value"],
                color=f"C{methods.index(run_method)}",
                alpha=0.85,
                linewidth=1.2,
                marker="." if len(run_part) < 30 else None,
            )
        if unit == "iteration" and _spans_decades(part["value"]):
            axis.set_yscale("log")
        axis.set_title(key if method is None else f"{key} · {method}", fontsize=10)
        axis.set_xlabel(unit, fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    handles = [Line2D([], [], color=f"C{i}", label=m) for i, m in enumerate(methods)]
    _finish(figure, None, 1, handles=handles, ncol=min(len(methods), 4))
    return figure


def plot_training_curves(curves: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write :func:`training_curves_figure` to the PNG file ``path``."""
    return _save(training_curves_figure(curves), path)
