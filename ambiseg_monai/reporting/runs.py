"""Pick MLflow runs to compare (by experiment, run id, tag, dataset, filter) and label them by method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import mlflow
from mlflow.entities import Run, ViewType

from ambiseg_monai.reporting import naming

__all__ = ["RunSelection", "GROUP_BY_CHOICES", "select_runs", "experiment_names", "group_label"]

GROUP_BY_CHOICES = ("experiment", "run", "tag:<key>", "param:<key>")


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


@dataclass(frozen=True)
class RunSelection:
    """Which runs to compare. Criteria combine with AND; unset criteria do not filter.

    Attributes:
        experiments: experiment names; default every active experiment except the comparisons'.
        run_ids: explicit run ids (the other criteria still apply to them).
        tags: tag key -> required value.
        dataset: required dataset name (tag ``ambiseg.dataset``, set by the provenance logging).
        filter_string: any further MLflow search filter, e.g. ``"params.seed = '1'"``.
    """

    experiments: Sequence[str] | None = None
    run_ids: Sequence[str] | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    dataset: str | None = None
    filter_string: str | None = None

    def filter_clauses(self) -> list[str]:
        """The criteria as MLflow search-filter clauses (joined with AND by :func:`select_runs`)."""
        tags = dict(self.tags)
        if self.dataset is not None:
            tags[naming.TAG_DATASET] = self.dataset
        clauses = [f"tags.`{key}` = {_quote(value)}" for key, value in tags.items()]
        if self.filter_string:
            clauses.append(self.filter_string)
        return clauses

    def describe(self) -> dict[str, str]:
        """The selection as short strings (logged as params of the comparison run)."""
        return {
            "experiments": ",".join(self.experiments) if self.experiments else "(all)",
            "run_ids": ",".join(self.run_ids) if self.run_ids else "(any)",
            "filter": " and ".join(self.filter_clauses()) or "(none)",
        }


def experiment_names(client: mlflow.MlflowClient) -> dict[str, str]:
    """experiment id -> name, for every active experiment of the store."""
    return {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}


def select_runs(
    client: mlflow.MlflowClient,
    selection: RunSelection = RunSelection(),
    comparison_experiment: str = naming.COMPARISON_EXPERIMENT,
) -> list[Run]:
    """Runs of the store matching ``selection``, ordered by experiment name then start time.

    Raises:
        ValueError: an experiment or run id does not exist, or nothing matches (the message says what
            the store holds, to help fix the selection).
    """
    names = experiment_names(client)
    ids_by_name = {name: eid for eid, name in names.items()}
    if selection.experiments:
        missing = [n for n in selection.experiments if n not in ids_by_name]
        if missing:
            raise ValueError(f"{client.tracking_uri}: no experiment named {missing}; it has {sorted(ids_by_name)}.")
        experiment_ids = [ids_by_name[n] for n in selection.experiments]
    else:
        experiment_ids = [eid for eid, name in names.items() if name != comparison_experiment]
    clauses = selection.filter_clauses()
    if selection.run_ids:
        unknown = [r for r in selection.run_ids if not _run_exists(client, r)]
        if unknown:
            raise ValueError(f"{client.tracking_uri}: no run with id {unknown}.")
        ids = ", ".join(_quote(r) for r in selection.run_ids)
        clauses.append(f"attributes.run_id IN ({ids})")
    runs: list[Run] = []
    token = None
    while experiment_ids:
        page = client.search_runs(
            experiment_ids,
            filter_string=" and ".join(clauses),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    if not runs:
        raise ValueError(
            f"{client.tracking_uri}: no run matches experiments={selection.experiments or '(all)'} "
            f"filter={' and '.join(clauses) or '(none)'}; experiments in the store: {sorted(ids_by_name)}."
        )
    return sorted(runs, key=lambda r: (names.get(r.info.experiment_id, ""), r.info.start_time or 0))


def _run_exists(client: mlflow.MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def group_label(run: Run, group_by: str, names: Mapping[str, str]) -> str:
    """The method a run belongs to: its experiment name (default: experiments are named after
    bundles), its run name, or a tag / param value (``tag:ambiseg.bundle``, ``param:network_def.channels``)."""
    if group_by == "experiment":
        return names.get(run.info.experiment_id, run.info.experiment_id)
    if group_by == "run":
        return run.info.run_name or run.info.run_id
    kind, _, key = group_by.partition(":")
    source = {"tag": run.data.tags, "param": run.data.params}.get(kind)
    if source is None or not key:
        raise ValueError(f"group_by {group_by!r}: choose from {GROUP_BY_CHOICES}.")
    if key not in source:
        raise ValueError(f"run {run.info.run_id} ({run.info.run_name}) has no {kind} {key!r} to group by.")
    return source[key]
