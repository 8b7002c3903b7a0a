"""Compare methods across runs of a shared MLflow store: Markdown + CSV table (mean ± std over runs of
the final evaluation metrics at each number of samples) and PNG plots, logged as a comparison run.
Before any evaluation (right after training), the training runs' best validation metrics are compared
instead, labelled as such in the table, the plots and the printed summary.

Example: ambiseg compare --tracking-uri sqlite:///mlruns.db --dataset demo --out comparison/
"""

from __future__ import annotations

import argparse
import os

from mlflow.exceptions import MlflowException

from ambiseg_monai.reporting import naming
from ambiseg_monai.reporting.report import compare_runs
from ambiseg_monai.reporting.runs import RunSelection
from ambiseg_monai.reporting.tracking import DEFAULT_TRACKING_URI

#: the library API (the ``ambiseg`` subcommand's ``configure_parser`` and ``main`` are not part of it)
__all__ = ["parse_tags"]


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _sample_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in _comma_list(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--samples expects comma-separated integers, got {text!r}") from error
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--samples expects positive integers, got {text!r}")
    return counts


def parse_tags(pairs: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a pair without ``=`` is an error naming it."""
    tags = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {pair!r}: expected KEY=VALUE.")
        tags[key] = value
    return tags


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ambiseg compare``."""
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
        help="MLflow store: sqlite:///path.db or http://host:port (default: $MLFLOW_TRACKING_URI or %(default)s)",
    )
    select = parser.add_argument_group("run selection (criteria combine with AND)")
    select.add_argument(
        "--experiment", action="append", help="experiment name (repeatable; default: all but the comparisons')"
    )
    select.add_argument("--run-id", action="append", help="run id (repeatable)")
    select.add_argument("--tag", action="append", metavar="KEY=VALUE", help="required tag value (repeatable)")
    select.add_argument("--dataset", help=f"dataset name (tag {naming.TAG_DATASET})")
    select.add_argument("--filter", dest="filter_string", help="extra MLflow search filter, e.g. \"params.seed = '1'\"")
    parser.add_argument(
        "--group-by",
        default="experiment",
        help="method label of a run: experiment (default), run, tag:<key> or param:<key>",
    )
    parser.add_argument(
        "--metrics",
        type=_comma_list,
        default=",".join(naming.REPORT_METRICS),
        help="comma-separated metric names (default: %(default)s)",
    )
    parser.add_argument(
        "--samples", type=_sample_counts, default=None, help="numbers of samples to include, e.g. 4,16 (default: all)"
    )
    parser.add_argument(
        "--curves", type=_comma_list, default=None, help="metric keys for the training curves (default: automatic)"
    )
    parser.add_argument("--out", default="comparison", help="output folder (default: %(default)s)")
    parser.add_argument("--title", default="Method comparison", help="report heading")
    parser.add_argument(
        "--comparison-experiment",
        default=naming.COMPARISON_EXPERIMENT,
        help="experiment the report is logged to (default: %(default)s)",
    )
    parser.add_argument(
        "--no-log", action="store_true", help="write the report files only; do not log a comparison run"
    )


def main(args: argparse.Namespace) -> int:
    """Build the report, print the table and where the files are."""
    selection = RunSelection(
        experiments=args.experiment,
        run_ids=args.run_id,
        tags=parse_tags(args.tag),
        dataset=args.dataset,
        filter_string=args.filter_string,
    )
    try:
        report = compare_runs(
            args.tracking_uri,
            selection,
            args.out,
            args.group_by,
            args.metrics,
            args.samples,
            args.curves,
            not args.no_log,
            args.comparison_experiment,
            args.title,
        )
    except MlflowException as error:  # e.g. a malformed --filter or an unreachable server
        raise ValueError(f"MLflow ({args.tracking_uri}): {error.message}") from error
    print(report.markdown.split("\n## ")[0].rstrip())
    print()
    for part, path in report.files.items():
        print(f"{part}: {path}")
    if report.comparison_run_id:
        print(f"logged to experiment {args.comparison_experiment!r}, run {report.comparison_run_id}")
    return 0
