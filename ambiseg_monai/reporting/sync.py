"""Copy MLflow runs from one tracking store to another (e.g. an offline SQLite store into a server).

::

    python -m ambiseg_monai.reporting.sync --from sqlite:////abs/mlruns-offline.db --to http://127.0.0.1:5000

Experiments are matched by name (created in the destination when missing). Each run is copied with
its name, start/end time, status, params, tags, full metric histories, dataset inputs and artifacts,
and tagged ``ambiseg.synced_from=<source run id>``; a run already copied is skipped, so running the
command twice copies nothing twice.

A run that *continues* a destination run (logged offline after the server failed mid-run, tagged
``ambiseg.continues_run=<server run id>``) is merged into that run instead: its metric histories, the
params and tags the server run lacks, its artifacts and its final status are added to it, and the server
run is tagged ``ambiseg.synced_from.<source run id>`` so the merge also happens only once. When the
destination has no such run (another server), the run is copied as above.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag, ViewType

from ambiseg_monai.reporting import naming
from ambiseg_monai.reporting.tracking import TAG_CONTINUES_RUN, TAG_CONTINUES_URI, open_tracking_client

#: the library API (the ``ambiseg`` subcommand's ``configure_parser`` and ``main`` are not part of it)
__all__ = [
    "SyncedRun",
    "sync_runs",
]

# Tags MLflow derives from the run itself; copying them would clash with the destination's own.
_SKIPPED_TAGS = ("mlflow.runName",)


@dataclass(frozen=True)
class SyncedRun:
    """One source run and what happened to it."""

    experiment: str
    source_run_id: str
    destination_run_id: str | None
    copied: bool  # False: it was already in the destination
    merged: bool = False  # True: added to the destination run it continues (see TAG_CONTINUES_RUN)


def _all_runs(client: mlflow.MlflowClient, experiment_id: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _copy_run(source: mlflow.MlflowClient, destination: mlflow.MlflowClient, run, experiment_id: str) -> str:
    tags = {k: v for k, v in run.data.tags.items() if k not in _SKIPPED_TAGS}
    tags[naming.TAG_SYNCED_FROM] = run.info.run_id
    new = destination.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
    run_id = new.info.run_id
    metrics = _metric_histories(source, run)
    params = [Param(k, v) for k, v in run.data.params.items()]
    destination.log_batch(run_id, metrics=metrics, params=params)
    _copy_inputs_artifacts_status(source, destination, run, run_id)
    return run_id


def _metric_histories(source: mlflow.MlflowClient, run) -> list[Metric]:
    """Every logged value (all steps) of every metric of ``run``."""
    return [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in run.data.metrics
        for m in source.get_metric_history(run.info.run_id, key)
    ]


def _copy_inputs_artifacts_status(
    source: mlflow.MlflowClient, destination: mlflow.MlflowClient, run, run_id: str
) -> None:
    """Dataset inputs, artifacts and (unless still running) the final status of ``run`` onto ``run_id``."""
    if run.inputs is not None and run.inputs.dataset_inputs:
        destination.log_inputs(run_id, datasets=list(run.inputs.dataset_inputs))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(source.download_artifacts(run.info.run_id, "", tmp))
        if any(local.iterdir()):
            destination.log_artifacts(run_id, str(local))
    if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
        destination.set_terminated(run_id, status=run.info.status, end_time=run.info.end_time)


def _merged_marker(source_run_id: str) -> str:
    return f"{naming.TAG_SYNCED_FROM}.{source_run_id}"


def _continued_run(destination: mlflow.MlflowClient, run):
    """The destination run that ``run`` continues (None when it continues none, or one this store lacks)."""
    target_id = run.data.tags.get(TAG_CONTINUES_RUN)
    if not target_id:
        return None
    try:
        target = destination.get_run(target_id)
    except mlflow.exceptions.MlflowException:
        return None
    return None if target.info.lifecycle_stage != "active" else target


def _merge_run(source: mlflow.MlflowClient, destination: mlflow.MlflowClient, run, target) -> str:
    """Add ``run`` (continued offline) to ``target``, the server run it continues."""
    run_id = target.info.run_id
    metrics = _metric_histories(source, run)
    params = [Param(k, v) for k, v in run.data.params.items() if k not in target.data.params]
    skipped = (*_SKIPPED_TAGS, TAG_CONTINUES_RUN, TAG_CONTINUES_URI)
    tags = [RunTag(k, v) for k, v in run.data.tags.items() if k not in skipped and k not in target.data.tags]
    destination.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    _copy_inputs_artifacts_status(source, destination, run, run_id)
    destination.set_tag(run_id, _merged_marker(run.info.run_id), "merged")  # last: a failed merge is redone
    return run_id


def sync_runs(
    source_uri: str,
    destination_uri: str,
    experiments: Sequence[str] | None = None,
) -> list[SyncedRun]:
    """Copy every run of the source store's experiments (or only of ``experiments``) to the destination.

    Args:
        source_uri: tracking URI to copy from.
        destination_uri: tracking URI to copy to.
        experiments: experiment names to copy; default all active experiments with runs.

    Returns:
        one :class:`SyncedRun` per source run.
    """
    if source_uri == destination_uri:
        raise ValueError(f"source and destination are the same store ({source_uri}).")
    source = mlflow.MlflowClient(source_uri)
    destination = open_tracking_client(destination_uri)  # may be a new store
    available = {e.name: e for e in source.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
    names = list(experiments) if experiments else sorted(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"{source_uri}: no experiment named {missing}; it has {sorted(available)}.")
    results: list[SyncedRun] = []
    for name in names:
        runs = _all_runs(source, available[name].experiment_id)
        if not runs:
            continue
        target = destination.get_experiment_by_name(name)
        experiment_id = (
            target.experiment_id if target else destination.create_experiment(name, tags=available[name].tags)
        )
        done = {
            r.data.tags[naming.TAG_SYNCED_FROM]: r.info.run_id
            for r in _all_runs(destination, experiment_id)
            if naming.TAG_SYNCED_FROM in r.data.tags
        }
        # oldest first, so the destination lists runs in the order they were made
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            target = _continued_run(destination, run)
            if target is not None:
                if _merged_marker(run.info.run_id) in target.data.tags:
                    results.append(SyncedRun(name, run.info.run_id, target.info.run_id, copied=False, merged=True))
                else:
                    _merge_run(source, destination, run, target)
                    results.append(SyncedRun(name, run.info.run_id, target.info.run_id, copied=True, merged=True))
            elif run.info.run_id in done:
                results.append(SyncedRun(name, run.info.run_id, done[run.info.run_id], copied=False))
            else:
                new_id = _copy_run(source, destination, run, experiment_id)
                results.append(SyncedRun(name, run.info.run_id, new_id, copied=True))
    return results


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of the sync command."""
    parser.add_argument(
        "--from", dest="source", required=True, help="tracking URI to copy from (e.g. sqlite:////abs/mlruns-offline.db)"
    )
    parser.add_argument(
        "--to", dest="destination", required=True, help="tracking URI to copy to (e.g. http://127.0.0.1:5000)"
    )
    parser.add_argument(
        "--experiment", action="append", default=None, help="experiment name to copy (repeatable; default: all)"
    )


def main(args: argparse.Namespace) -> int:
    """Run the sync and print one line per experiment."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run drowns the summary
    results = sync_runs(args.source, args.destination, args.experiment)
    for name in dict.fromkeys(r.experiment for r in results):
        copied = sum(r.copied for r in results if r.experiment == name)
        skipped = sum(not r.copied for r in results if r.experiment == name)
        merged = sum(r.copied and r.merged for r in results if r.experiment == name)
        note = f" ({merged} merged into the server run it continues)" if merged else ""
        print(f"{name}: {copied} run(s) copied{note}, {skipped} already present")
    if not results:
        print("nothing to copy: the source store has no runs")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m ambiseg_monai.reporting.sync", description=__doc__.split("\n\n")[0]
    )
    configure_parser(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except (ValueError, mlflow.exceptions.MlflowException) as _error:
        print(f"sync: error: {_error}", file=sys.stderr)
        sys.exit(1)
