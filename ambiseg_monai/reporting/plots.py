"""PNG plots of a comparison: metric bars per method, metric against number of samples, training curves.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), so plotting works
headless and does not change the caller's matplotlib backend.
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

__all__ = ["plot_metric_bars", "plot_metric_vs_samples", "plot_training_curves"]

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


def plot_metric_bars(
    table: pd.DataFrame, path: str | os.PathLike, metrics: Sequence[str] = naming.REPORT_METRICS
) -> Path:
    """One panel per metric: a bar per method and number of samples N, error bar = std over runs.

    Args:
        table: output of :func:`table.comparison_table`.
        path: PNG file to write.
        metrics: metrics to plot (those missing from the table are skipped).
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
    figure.legend(handles, labels, loc="upper center", ncol=len(counts), frameon=False, title="samples per image")
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(figure, path)


def plot_metric_vs_samples(
    table: pd.DataFrame, path: str | os.PathLike, metrics: Sequence[str] = naming.REPORT_METRICS
) -> Path:
    """One panel per metric: the metric against the number of samples N (log2 axis), a line per method,
    error bars = std over runs."""
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
    figure.legend(handles, labels, loc="upper center", ncol=min(len(methods), 4), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(figure, path)


def plot_training_curves(curves: pd.DataFrame, path: str | os.PathLike) -> Path:
    """One panel per logged metric key (e.g. ``train_loss``, ``val_ged``): value against step,
    a line per run, coloured by method.

    Args:
        curves: long table with columns ``method, run_name, key, step, value``.
        path: PNG file to write.
    """
    required = {"method", "run_name", "key", "step", "value"}
    if curves.empty or not required <= set(curves.columns):
        raise ValueError(f"training curves need a non-empty table with columns {sorted(required)}.")
    keys = list(dict.fromkeys(curves["key"]))
    methods = list(dict.fromkeys(curves["method"]))
    figure, axes = _grid(len(keys), max_cols=3, panel_size=(4.2, 3.0))
    for axis, key in zip(axes, keys, strict=True):
        for (method, _run_name), part in curves[curves["key"] == key].groupby(["method", "run_name"], sort=False):
            part = part.sort_values("step")
            axis.plot(
                part["step"],
                part["value"],
                color=f"C{methods.index(method)}",
                alpha=0.85,
                linewidth=1.2,
                marker="." if len(part) < 30 else None,
            )
        axis.set_title(key, fontsize=10)
        axis.set_xlabel("step (as logged: iteration or epoch)", fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    handles = [Line2D([], [], color=f"C{i}", label=m) for i, m in enumerate(methods)]
    figure.legend(handles=handles, loc="upper center", ncol=min(len(methods), 4), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.88))
    return _save(figure, path)
