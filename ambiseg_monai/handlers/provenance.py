"""Ignite handler logging a run's provenance (hyperparameters, dataset identity, code version, executed
config) to MLflow when the engine starts.

(The per-image tables and ``test_n<N>_<metric>`` means of a final evaluation are written by
``PerImageMetricsWriter`` and ``MLflowMetricsLogger``; see :mod:`ambiseg_monai.reporting.naming`.)

Bundle usage, next to MONAI's ``MLFlowHandler`` (before or after it: the run is started here if
needed; without ``config`` the command line's config files and overrides are logged)::

    {"_target_": "ambiseg_monai.handlers.provenance.ProvenanceHandler", "_disabled_": "@is_not_rank0",
     "mlflow_handler": "@train#mlflow_handler", "dataset_dir": "@dataset_path",
     "bundle": "@bundle_name", "run_kind": "training"}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from ignite.engine import Engine, Events

from ambiseg_monai.handlers.mlflow_logging import config_files_from_argv
from ambiseg_monai.reporting.provenance import load_config, log_provenance

__all__ = ["ProvenanceHandler", "executed_config_from_argv"]


def executed_config_from_argv(argv: Sequence[str] | None = None) -> dict | None:
    """The config a ``python -m monai.bundle run`` command line executes: its ``--config_file`` files merged
    in order, then its ``--key value`` overrides (``a#b`` / ``a::b`` ids set nested keys); None without files."""
    from monai.bundle import ConfigParser

    files, overrides = config_files_from_argv(argv)
    files = [f for f in files if Path(f).is_file()]
    if not files:
        return None
    parser = ConfigParser(ConfigParser.load_config_files(files))
    parser.update(overrides)  # as ``monai.bundle run`` applies its overrides
    return parser.get()


def _client_and_run(mlflow_handler: Any | None, engine: Engine, owner: str) -> tuple[mlflow.MlflowClient, str]:
    """The client and run id of ``mlflow_handler`` (started here if it has not started yet), or of the
    active ``mlflow.start_run`` run when no handler is given."""
    if mlflow_handler is not None:
        if mlflow_handler.cur_run is None:
            # Handlers run in attachment order; starting the MLflow run here makes the order irrelevant
            # (MLFlowHandler.start reuses a run that is already set).
            mlflow_handler.start(engine)
        return mlflow_handler.client, mlflow_handler.cur_run.info.run_id
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError(f"{owner}: no mlflow_handler given and no active MLflow run (mlflow.start_run).")
    return mlflow.MlflowClient(), active.info.run_id


class ProvenanceHandler:
    """Log what a reader needs to trust a run, at ``Events.STARTED``, to the run of an ``MLFlowHandler``
    (or, without one, to the active ``mlflow.start_run`` run).

    Logged: the flattened config as params, tags ``ambiseg.bundle / run_kind / dataset /
    datalist_sha256 / code_version / git_describe``, and the executed config as
    ``config/executed_config.json`` (skip that file with ``log_config_file=False`` when
    ``MLflowConfigLogger`` already logs it).

    Args:
        config: the executed config: a dict, or the config file(s) merged in order (e.g. the path
            MONAI's tracking writes to ``@save_execute_config``). Default: the config files and
            ``--key value`` overrides of the ``python -m monai.bundle run`` command line (nothing
            when there is none).
        dataset_dir: dataset folder (name and SHA-256 of its ``datalist.json``); None to skip.
        mlflow_handler: MONAI ``MLFlowHandler`` whose run receives the provenance.
        bundle: bundle name.
        run_kind: ``training``, ``evaluation`` or ``inference``.
        log_config_file: also log the executed config as an artifact.
        is_main_process: False on non-zero ranks of a distributed run (nothing is logged there).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        dataset_dir: str | os.PathLike | None = None,
        mlflow_handler: Any | None = None,
        bundle: str | None = None,
        run_kind: str | None = None,
        log_config_file: bool = True,
        is_main_process: bool = True,
    ) -> None:
        # read the config now, so that a wrong path fails when the bundle is parsed, not after setup
        self.config = load_config(config) if config is not None else executed_config_from_argv()
        if dataset_dir is not None and not Path(dataset_dir).is_dir():
            raise FileNotFoundError(f"ProvenanceHandler: dataset_dir {dataset_dir} is not a folder.")
        self.dataset_dir = dataset_dir
        self.mlflow_handler = mlflow_handler
        self.bundle = bundle
        self.run_kind = run_kind
        self.log_config_file = log_config_file
        self.is_main_process = is_main_process
        self.logged_run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine`` (trainer or evaluator)."""
        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)

    def _client_and_run(self, engine: Engine) -> tuple[mlflow.MlflowClient, str]:
        return _client_and_run(self.mlflow_handler, engine, type(self).__name__)

    def started(self, engine: Engine) -> None:
        """Log params, tags and the executed config (once per run, also when the engine restarts)."""
        if not self.is_main_process:
            return
        client, run_id = self._client_and_run(engine)
        if run_id == self.logged_run_id:
            return
        log_provenance(client, run_id, self.config, self.dataset_dir, self.bundle, self.run_kind,
                       log_config_file=self.log_config_file)
        self.logged_run_id = run_id
