"""MLflow handlers shared by the bundles: the run's provenance and parameters, metrics under a prefix, the trained
model as an MLflow model, a failure-tolerant ``MLFlowHandler``, and the helpers they share (run names, artifacts).

MONAI's ``MLFlowHandler`` owns the run (tracking URI, experiment, metrics). The handlers here log into *that*
run through the handler's client, so every bundle writes one run per training to the shared store
(``sqlite:///mlruns.db`` by default):

- :class:`ProvenanceHandler`: the one place for what a run was: its parameters (the resolved
  hyperparameters and the whole config as written), the executed config and config files, dataset identity (also
  as the run's MLflow dataset input), source and code version (see
  :func:`ambiseg_monai.reporting.provenance.log_provenance`);
- :class:`MLflowMetricsLogger`: ``engine.state.metrics`` under a name prefix (``test_n16_ged``);
- :class:`MLflowModelLogger`: at the end of a training, the trained model as an MLflow model (a ``pyfunc``
  sampling N masks plus mean and variance maps, see :mod:`ambiseg_monai.reporting.mlflow_model`);
- :class:`GuardedMLFlowHandler`: ``MLFlowHandler`` whose client survives a tracking server failing mid-run
  (see :class:`ambiseg_monai.reporting.tracking.FailoverClient`) and whose experiments are tagged as MLflow 3
  model-training experiments.

Per-image tables are written by :class:`~ambiseg_monai.handlers.PerImageMetricsWriter` and logged with the
evaluation folder (``MLFlowHandler(artifacts=...)``); loss terms by
:class:`~ambiseg_monai.handlers.LossTerms` as the handlers' ``output_transform``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from ambiseg_monai.bundle.config import as_flag
from ambiseg_monai.handlers.checkpoint import latest_checkpoint
from ambiseg_monai.handlers.progress import training_already_finished
from ambiseg_monai.reporting import naming
from ambiseg_monai.reporting.mlflow_model import (
    MODEL_NAME,
    checkpoint_state_dict,
    log_segmentation_model,
    model_bundle_config,
)
from ambiseg_monai.reporting.provenance import (
    config_being_parsed,
    config_files_from_argv,
    executed_config_from_argv,
    load_config,
    log_dataset_input,
    log_executed_config,
    log_provenance,
    mark_training_experiment,
    parser_being_parsed,
    source_tags,
)

__all__ = [
    "default_run_name",
    "mlflow_run_id",
    "log_artifact",
    "ProvenanceHandler",
    "MLflowMetricsLogger",
    "MLflowModelLogger",
    "GuardedMLFlowHandler",
]

logger = logging.getLogger(__name__)

#: Artifact folder of the copies of the config files a run was started with.
CONFIG_FILES_ARTIFACT_DIR = f"{naming.CONFIG_ARTIFACT_DIR}/files"


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
    """Log what a reader needs to trust and re-run a run, at ``Events.STARTED``, to the run of an
    ``MLFlowHandler`` (or, without one, to the active ``mlflow.start_run`` run). The one path for a run's
    parameters: a bundle needs no ``experiment_param`` list next to it.

    Logged (once per run, also when the engine restarts):

    - params: the resolved hyperparameters, unprefixed (``learning_rate``, ``max_epochs``, ...: every
      top-level config value known without running the bundle, plus ``params``), and the whole config as
      written, flattened under ``config.`` (``config.network_def.denoiser.channels.0``);
    - tags ``ambiseg.bundle / run_kind / dataset / datalist_sha256 / code_version / git_describe``, and MLflow's
      own ``mlflow.source.type / name / git.commit`` (the Source field of the MLflow UI; see
      :func:`~ambiseg_monai.reporting.provenance.source_tags`);
    - the dataset as the run's MLflow dataset input (name, digest of ``datalist.json``, source path, split sizes;
      context: the run kind), see :func:`~ambiseg_monai.reporting.provenance.log_dataset_input`;
    - artifacts ``config/executed_config.json`` (the config files merged in order plus the command line's
      overrides) and, when the config came from files, a copy of each under ``config/files/``.

    Args:
        config: the executed config: a dict, or the config file(s) merged in order (e.g. the path MONAI's
            ``--tracking`` writes to ``@save_execute_config``). Default: the config of the bundle that builds
            this handler (the ``monai.bundle`` parser's content: files merged, overrides applied; see
            :func:`~ambiseg_monai.reporting.provenance.config_being_parsed`), else the config files and
            ``--key value`` overrides of the ``python -m monai.bundle run`` command line (nothing when there is
            neither). The config files named on the command line are copied to ``config/files/``.
        dataset_dir: dataset folder (name and SHA-256 of its ``datalist.json``); None to skip.
        mlflow_handler: MONAI ``MLFlowHandler`` whose run receives the provenance.
        bundle: bundle name.
        run_kind: ``training``, ``evaluation`` or ``inference``.
        params: resolved values the config computes (``$`` expressions, e.g. ``{"num_raters": "@num_raters"}``),
            logged as unprefixed params next to the literal hyperparameters.
        log_hyperparameters: log the config's top-level literal values as unprefixed params.
        log_config_file: also log the executed config and the config files as artifacts.
        is_main_process: False on non-zero ranks of a distributed run (nothing is logged there).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        dataset_dir: str | os.PathLike | None = None,
        mlflow_handler: Any | None = None,
        bundle: str | None = None,
        run_kind: str | None = None,
        params: Mapping[str, Any] | None = None,
        log_hyperparameters: bool = True,
        log_config_file: bool = True,
        is_main_process: bool = True,
    ) -> None:
        # read the config now, so that a wrong path fails when the bundle is parsed, not after setup
        # the config files as the command line names them: the run's source (mlflow.source.name)
        self.source_files = config_files_from_argv()[0]
        if config is None:
            self.config = config_being_parsed() or executed_config_from_argv()
            files: list[str | os.PathLike] = list(self.source_files) if self.config is not None else []
        elif isinstance(config, Mapping):
            self.config, files = load_config(config), []
        else:
            files = [config] if isinstance(config, (str, os.PathLike)) else list(config)
            self.config = load_config(files)
            self.source_files = [str(f) for f in files]
        self.config_files = [Path(f) for f in files if Path(f).is_file()]
        if dataset_dir is not None and not Path(dataset_dir).is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: dataset_dir {dataset_dir} is not a folder.")
        self.dataset_dir = dataset_dir
        self.mlflow_handler = mlflow_handler
        self.bundle = bundle
        self.run_kind = run_kind
        self.params = dict(params or {})
        self.log_hyperparameters = log_hyperparameters
        self.log_config_file = log_config_file
        self.is_main_process = is_main_process
        self.logged_run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine`` (trainer or evaluator)."""
        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)

    def started(self, engine: Engine) -> None:
        """Log params, tags and the config artifacts (once per run, also when the engine restarts)."""
        if not self.is_main_process or training_already_finished(engine):
            return  # a finished training re-run logs nothing
        client, run_id = _client_and_run(self.mlflow_handler, engine, type(self).__name__)
        if run_id == self.logged_run_id:
            return
        log_provenance(
            client,
            run_id,
            self.config,
            self.dataset_dir,
            self.bundle,
            self.run_kind,
            extra_tags=source_tags(self.source_files),
            log_config_file=False,
            params=self.params,
            log_hyperparameters=self.log_hyperparameters,
        )
        if self.dataset_dir is not None:
            log_dataset_input(client, run_id, self.dataset_dir, context=self.run_kind)
        if self.log_config_file:
            self._log_config_artifacts(client, run_id)
        self.logged_run_id = run_id

    def _log_config_artifacts(self, client: mlflow.MlflowClient, run_id: str) -> None:
        if self.config is None:
            logger.info("no config file found to log to MLflow")
            return
        log_executed_config(client, run_id, self.config)
        for path in self.config_files:
            client.log_artifact(run_id, str(path), CONFIG_FILES_ARTIFACT_DIR)


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


class MLflowModelLogger:
    """At the end of a training, log the trained model to the training's MLflow run as an MLflow model: a
    ``pyfunc`` taking images B x C x H x W and returning N masks plus mean and variance maps, loadable with
    ``mlflow.pyfunc.load_model`` and servable with ``mlflow models serve`` (see
    :mod:`ambiseg_monai.reporting.mlflow_model`; docs/deploy.md).

    The model is what the bundle's ``inference.json`` would run: the weights it loads (the ``load_dict`` entry,
    e.g. ``ema``, of ``checkpoint``, the best checkpoint ``model.pt``; when no validation has written it yet, the
    same entry of the newest training checkpoint in its folder), and its ``infer#inferer`` and
    ``infer#postprocessing`` built from the executed training config with ``inference_config`` on top (without
    an inference config: the validation's inferer and post-processing). The images it takes have the shape of
    the training images (C x H x W of the last training batch). The model's step is the epoch of its weights
    (the validator's best epoch), so that the MLflow UI lists that epoch's metrics with the model.

    Logging prints one line: the model URI, where the weights come from, the seconds it took and the
    ``MLFLOW_TRACKING_URI=<store> mlflow models serve ...`` command. A training run again after it finished logs
    nothing; without an MLflow run there is nothing to log to. A failure (e.g. a checkpoint that cannot be read,
    the tracking store) is logged as a warning: the training and its checkpoints are complete either way.

    Args:
        mlflow_handler: the trainer's MONAI ``MLFlowHandler`` (its run receives the model). Attach this handler
            before it: the bundles' ``MLFlowHandler`` ends its run at ``Events.COMPLETED``.
        checkpoint: the checkpoint ``inference.json`` loads (``$@ckpt_dir + '/model.pt'``).
        checkpoint_key: the checkpoint entry holding the weights (``ema``, ``network``); default: the one key of
            the config's ``ckpt_load_dict`` (what evaluation and inference load), else none (a plain state dict).
        inference_config: the bundle's ``inference.json`` (read when this handler is built; ``%`` macros resolved
            from the working directory, as ``monai.bundle run`` does); None, a missing or unreadable file: the
            validation's sampler (``fallback_ids``). The model's tag ``ambiseg.sampler`` says which it is.
        config: the executed training config; default: the config of the bundle parser building this handler,
            whose resolved values (e.g. ``num_raters``) are written into the model's config.
        validator: the validation evaluator (its best epoch is the model's step), or None.
        network_id, inferer_id, postprocessing_id: config ids of the network, the N-sample inferer and its
            post-processing in the merged config.
        fallback_ids: ``(inferer_id, postprocessing_id)`` without an inference config.
        name: the model's name (``runs:/<run id>/<name>``).
        enabled: the bundles' switch ``log_mlflow_model``; False logs nothing. Read with
            :func:`~ambiseg_monai.bundle.config.as_flag`: also ``0`` / ``1`` and the strings it accepts
            (``"false"``, ``"no"``, ``"off"``, ``"0"``, ...); any other value is an error.
        is_main_process: False on non-zero ranks of a distributed run (nothing is logged there).
    """

    def __init__(
        self,
        mlflow_handler: Any,
        checkpoint: str | os.PathLike,
        checkpoint_key: str | None = None,
        inference_config: str | os.PathLike | None = None,
        config: Mapping[str, Any] | None = None,
        validator: Engine | None = None,
        network_id: str = "network_def",
        inferer_id: str = "infer#inferer",
        postprocessing_id: str | None = "infer#postprocessing",
        fallback_ids: tuple[str, str | None] = ("validate#inferer", "validate#postprocessing"),
        name: str = MODEL_NAME,
        enabled: bool | str = True,
        is_main_process: bool = True,
    ) -> None:
        from monai.bundle import ConfigParser

        self.enabled = as_flag(enabled, "log_mlflow_model")
        self.mlflow_handler = mlflow_handler
        self.checkpoint = Path(checkpoint)
        self.validator = validator
        self.network_id = network_id
        self.inferer_id, self.postprocessing_id = inferer_id, postprocessing_id
        self.name = name
        self.is_main_process = is_main_process
        self.image_shape: tuple[int, ...] | None = None
        self.finished_before = False
        self.model_uri: str | None = None
        self.inference_config: dict | None = None
        self.checkpoint_key = checkpoint_key
        if not self.enabled:
            return
        parser = parser_being_parsed() if config is None else None
        if config is None and parser is None:
            raise ValueError(f"{type(self).__name__}: give the training config (none is being parsed).")
        self._parser = parser if parser is not None else ConfigParser(dict(config or {}))
        self.config = json.loads(json.dumps(self._parser.get(), default=str))
        if checkpoint_key is None and isinstance(self.config.get("ckpt_load_dict"), Mapping):
            keys = list(self.config["ckpt_load_dict"])
            if len(keys) != 1:
                raise ValueError(
                    f"{type(self).__name__}: ckpt_load_dict names {keys}; give the checkpoint entry of the network "
                    "(checkpoint_key)."
                )
            self.checkpoint_key = keys[0]
        self.sampler_source = f"{self.inferer_id} of {inference_config}"
        try:
            if inference_config is None or not Path(inference_config).is_file():
                raise FileNotFoundError(f"no inference config {inference_config}")
            inference = ConfigParser()
            inference.read_config(str(inference_config))
            inference.resolve_macro_and_relative_ids()
            self.inference_config = inference.get()
        except (OSError, ValueError, KeyError) as error:
            # e.g. a merged standalone bundle run from elsewhere: the model samples as the validation does
            self.inferer_id, self.postprocessing_id = fallback_ids
            self.sampler_source = f"{self.inferer_id} ({type(error).__name__}: {error})"

    def attach(self, engine: Engine) -> None:
        """Register on the trainer: STARTED (a finished training run again?), each iteration (the image shape),
        COMPLETED (log the model); nothing when not ``enabled``."""
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record_image_shape)
        engine.add_event_handler(Events.COMPLETED, self)

    def _on_started(self, engine: Engine) -> None:
        self.finished_before = training_already_finished(engine)

    def _record_image_shape(self, engine: Engine) -> None:
        if self.image_shape is None:
            batch = engine.state.batch
            image = batch.get("image") if isinstance(batch, Mapping) else None
            if image is not None and getattr(image, "ndim", 0) == 4:
                self.image_shape = tuple(int(s) for s in image.shape[1:])

    def _weights(self) -> tuple[Path, str]:
        """The checkpoint file to read and a description of it (best, or newest training checkpoint)."""
        if self.checkpoint.is_file():
            state = getattr(self.validator, "state", None)
            best_epoch = getattr(state, "best_metric_epoch", -1)
            key = getattr(state, "key_metric_name", None) or "key metric"
            if best_epoch is not None and best_epoch > 0:
                return self.checkpoint, f"{self.checkpoint.name}, best {key} at epoch {best_epoch}"
            return self.checkpoint, self.checkpoint.name
        newest = latest_checkpoint(self.checkpoint.parent)
        if newest is None:
            raise FileNotFoundError(f"neither {self.checkpoint} nor a training checkpoint next to it exists")
        return newest, f"{newest.name}, no validation has written {self.checkpoint.name}"

    def _step(self, engine: Engine) -> int:
        best_epoch = getattr(getattr(self.validator, "state", None), "best_metric_epoch", -1)
        return int(best_epoch) if best_epoch is not None and best_epoch > 0 else int(engine.state.epoch)

    def __call__(self, engine: Engine) -> None:
        """Log the model (at ``Events.COMPLETED``)."""
        if not self.enabled or not self.is_main_process or self.finished_before:
            return
        run_id = mlflow_run_id(self.mlflow_handler)
        if run_id is None:
            logger.warning("MLflow run not started: the trained model is not logged")
            return
        try:
            if self.image_shape is None:
                raise ValueError("no training batch with an 'image' of shape B x C x H x W was seen")
            path, source = self._weights()
            state_dict = checkpoint_state_dict(path, self.checkpoint_key)
            components = [
                self.network_id,
                self.inferer_id,
                *([self.postprocessing_id] if self.postprocessing_id else []),
            ]
            config = model_bundle_config(
                self.config, self.inference_config, components, self._parser.get_parsed_content
            )
            bundle = str(self.config.get("bundle_name") or "")
            logged = log_segmentation_model(
                self.mlflow_handler.client,
                run_id,
                config,
                state_dict,
                self.image_shape,
                network_id=self.network_id,
                inferer_id=self.inferer_id,
                postprocessing_id=self.postprocessing_id,
                name=self.name,
                step=self._step(engine),
                tags={naming.TAG_BUNDLE: bundle, "ambiseg.weights": source, "ambiseg.sampler": self.sampler_source},
                metadata={
                    "bundle": bundle,
                    "weights": source,
                    "sampler": self.sampler_source,
                    "image_shape": list(self.image_shape),
                },
            )
        except (OSError, ValueError, KeyError, RuntimeError, mlflow.exceptions.MlflowException) as error:
            logger.warning(f"the trained model was not logged to MLflow: {type(error).__name__}: {error}")
            return
        self.model_uri = logged.model_uri
        client = self.mlflow_handler.client
        # the store the model is in (a failover client's offline store once the server failed): `models:/` URIs
        # are looked up in MLFLOW_TRACKING_URI
        store = client.offline_uri if getattr(client, "offline", False) else getattr(client, "tracking_uri", None)
        serve = f"mlflow models serve -m {logged.model_uri} --env-manager local"
        logging.getLogger("ambiseg").info(
            f"MLflow model: {logged.model_uri} ({source}; logged in {logged.seconds:.1f} s); serve it with: "
            + (f"MLFLOW_TRACKING_URI={store} {serve}" if isinstance(store, str) and store else serve)
        )


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
        run_id_file: a JSON file (in the output folder) recording the run this handler logs to, with its
            tracking URI: written when the run starts, read when ``continue_run``.
        continue_run: log into the run recorded in ``run_id_file`` (when it is in the same store) instead of
            starting one: a resumed training continues its run; the validator's handler follows the trainer's.
        kwargs: the other ``MLFlowHandler`` arguments.

    A trainer resumed at its last epoch (a finished training run again) starts no run and logs nothing.

    The experiment is tagged as an MLflow 3 model-training experiment, not a GenAI one (unless its kind is
    already set; :func:`~ambiseg_monai.reporting.provenance.mark_training_experiment`).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        offline_tracking_uri: str | None = None,
        http_limits: Mapping[str, str] | None = None,
        run_id_file: str | os.PathLike | None = None,
        continue_run: bool = False,
        **kwargs,
    ) -> None:
        from ambiseg_monai.reporting.tracking import FailoverClient, sqlite_store_lock

        effective = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or ""
        with sqlite_store_lock(effective):  # MONAI's __init__ opens the store: create a new one once
            super().__init__(tracking_uri=tracking_uri, **kwargs)
        self.effective_tracking_uri = effective
        self.run_id_file = None if run_id_file is None else Path(run_id_file)
        self.continue_run = bool(continue_run)
        if effective.startswith(("http://", "https://")):
            self.client = FailoverClient(
                self.client,
                effective,
                offline_uri=offline_tracking_uri,
                experiment_name=self.experiment_name,
                run_name=self.run_name,
                http_limits=http_limits,
            )

    @property
    def recorded_run_id(self) -> str | None:
        """The run id in ``run_id_file`` when it names a run of this handler's store (else None)."""
        if self.run_id_file is None or not self.run_id_file.is_file():
            return None
        try:
            record = json.loads(self.run_id_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("tracking_uri") != self.effective_tracking_uri:
            return None
        run_id = record.get("run_id")
        return run_id if isinstance(run_id, str) and run_id else None

    def _set_experiment(self) -> None:
        """MONAI's experiment look-up (created when missing), then the experiment-kind tag when it has none."""
        known = self.experiment is not None
        super()._set_experiment()
        if not known and self.experiment is not None:
            mark_training_experiment(self.client, self.experiment)

    def start(self, engine: Engine) -> None:
        """Start (or continue, see ``continue_run``) the run; nothing for a finished training run again."""
        if training_already_finished(engine):
            return
        if self.cur_run is None and self.continue_run and (run_id := self.recorded_run_id) is not None:
            try:
                run = self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException as error:
                logger.info(f"MLflow run {run_id} recorded in {self.run_id_file} not found ({error}): a new run starts")
            else:
                if run.info.lifecycle_stage == "active":
                    if run.info.status != "RUNNING":
                        self.client.update_run(run_id, status="RUNNING")
                    self._set_experiment()
                    self.cur_run = self.client.get_run(run_id)
        super().start(engine)
        if self.run_id_file is not None and self.cur_run is not None:
            record = {"run_id": self.cur_run.info.run_id, "tracking_uri": self.effective_tracking_uri}
            self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
            self.run_id_file.write_text(json.dumps(record) + "\n", encoding="utf-8")
