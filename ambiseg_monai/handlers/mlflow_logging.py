"""MLflow helpers shared by the bundles: run names, the executed config, artifacts of a run.

MONAI's ``MLFlowHandler`` owns the run (tracking URI, experiment, metrics, parameters). The helpers
here log into *that* run through the handler's client, so every bundle writes one run per training
to the shared store (``sqlite:///mlruns.db`` by default). :class:`GuardedMLFlowHandler` is that
handler with a client that survives a tracking server failing mid-run (see
:class:`ambiseg_monai.reporting.tracking.FailoverClient`).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

__all__ = [
    "default_run_name",
    "mlflow_run_id",
    "log_artifact",
    "config_files_from_argv",
    "MLflowConfigLogger",
    "MLflowMetricsLogger",
    "GuardedMLFlowHandler",
]

logger = logging.getLogger(__name__)


def default_run_name(prefix: str) -> str:
    """``<prefix>_<YYYYmmdd_HHMMSS>``: one name shared by the trainer's and the validator's MLflow handlers."""
    return f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}"


def mlflow_run_id(mlflow_handler) -> str | None:
    """The id of the run a MONAI ``MLFlowHandler`` logs to (None before it started or when disabled)."""
    run = getattr(mlflow_handler, "cur_run", None)
    return None if run is None else run.info.run_id


def log_artifact(mlflow_handler, path: str | Path, artifact_path: str | None = None) -> bool:
    """Log a file into the handler's run; returns False (and logs why) when there is no active run."""
    run_id = mlflow_run_id(mlflow_handler)
    if run_id is None:
        logger.warning(f"MLflow run not started: {path} not logged")
        return False
    mlflow_handler.client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    return True


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def config_files_from_argv(argv: Sequence[str] | None = None) -> tuple[list[str], dict]:
    """The config files and ``--key value`` overrides of a ``python -m monai.bundle run`` command line.

    ``--config_file`` may be one path or a Python/JSON list of paths (an overlay after the base config).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    files: list[str] = []
    overrides: dict = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            if not _:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if key == "config_file":
                parsed = _parse_value(value)
                files = [str(f) for f in (parsed if isinstance(parsed, (list, tuple)) else [value])]
            elif key not in ("meta_file", "logging_file", "args_file", "tracking"):
                overrides[key] = _parse_value(value)
        i += 1
    return files, overrides


class MLflowConfigLogger:
    """At ``Events.STARTED``, log the executed configuration into the MLflow run of ``mlflow_handler``.

    Logs ``config/executed_config.json`` (the config files merged in order, as ``monai.bundle run``
    merges them, plus the command-line overrides) and a copy of each config file.

    Args:
        mlflow_handler: the MONAI ``MLFlowHandler`` attached (before this handler) to the same engine.
        config_files: files to log; default: those of the current ``monai.bundle run`` command line.
        overrides: extra key/value overrides to record; default: those of the command line.
    """

    def __init__(self, mlflow_handler, config_files: Sequence[str] | None = None, overrides: dict | None = None):
        self.mlflow_handler = mlflow_handler
        self.config_files = list(config_files) if config_files is not None else None
        self.overrides = overrides

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.bundle import ConfigParser

        files, overrides = config_files_from_argv()
        files = self.config_files if self.config_files is not None else files
        overrides = self.overrides if self.overrides is not None else overrides
        files = [f for f in files if Path(f).is_file()]
        if not files:
            logger.warning("no config file found to log to MLflow")
            return
        merged = ConfigParser.load_config_files(files)
        merged.update(overrides)
        with tempfile.TemporaryDirectory() as tmp:
            executed = Path(tmp) / "executed_config.json"
            executed.write_text(json.dumps(merged, indent=2, default=str), encoding="utf-8")
            if log_artifact(self.mlflow_handler, executed, "config"):
                for f in files:
                    log_artifact(self.mlflow_handler, f, "config/files")


class MLflowMetricsLogger:
    """At ``Events.COMPLETED``, log ``engine.state.metrics`` with a name prefix into ``mlflow_handler``'s run.

    Used when one run holds several evaluations of the same metrics (e.g. ``n4_ged`` and ``n16_ged``).

    Args:
        mlflow_handler: a MONAI ``MLFlowHandler`` attached to the same engine (it starts the run).
        prefix: prepended to every metric name.
    """

    def __init__(self, mlflow_handler, prefix: str = "") -> None:
        self.mlflow_handler = mlflow_handler
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        run_id = mlflow_run_id(self.mlflow_handler)
        if run_id is None:
            logger.warning("MLflow run not started: metrics not logged")
            return
        for name, value in engine.state.metrics.items():
            if isinstance(value, (int, float)):
                self.mlflow_handler.client.log_metric(run_id, f"{self.prefix}{name}", float(value))


class GuardedMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` whose logging survives the tracking server failing during the run.

    Same arguments as ``MLFlowHandler``. With an ``http(s)://`` tracking URI (the argument, or
    ``MLFLOW_TRACKING_URI``, which MONAI gives priority) the handler's ``client`` is a
    :class:`~ambiseg_monai.reporting.tracking.FailoverClient`: each request is bounded (one retry, 3 s
    timeout), and when the server stops answering, the rest of the run (including the request that failed)
    goes to the local SQLite store with a warning that gives the sync command. Every helper that logs
    through ``mlflow_handler.client`` (provenance, config, sample images, metrics) follows. Local stores
    (``sqlite:///``) are used as they are.

    Args:
        tracking_uri: as for ``MLFlowHandler``.
        offline_tracking_uri: the store used after a failure; default ``$AMBISEG_OFFLINE_TRACKING_URI`` or
            ``sqlite:///mlruns-offline.db``.
        http_limits: MLflow HTTP variables applied to each request (default
            :data:`~ambiseg_monai.reporting.tracking.HTTP_LIMITS`; a variable set in the environment wins).
        kwargs: the other ``MLFlowHandler`` arguments.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        offline_tracking_uri: str | None = None,
        http_limits: Mapping[str, str] | None = None,
        **kwargs,
    ) -> None:
        from ambiseg_monai.reporting.tracking import FailoverClient

        super().__init__(tracking_uri=tracking_uri, **kwargs)
        effective = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or ""
        if effective.startswith(("http://", "https://")):
            self.client = FailoverClient(
                self.client,
                effective,
                offline_uri=offline_tracking_uri,
                experiment_name=self.experiment_name,
                run_name=self.run_name,
                http_limits=http_limits,
            )
