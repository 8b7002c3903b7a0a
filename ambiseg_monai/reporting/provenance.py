"""What a reader needs to trust a run: hyperparameters, dataset identity, code version, the executed
config and the per-image evaluation tables, logged to an MLflow run.

Everything here takes an ``mlflow.MlflowClient`` and a run id, so it works with MONAI's
``MLFlowHandler`` (which owns a client and a run) as well as with ``mlflow.start_run``. In a bundle,
:class:`ambiseg_monai.handlers.ProvenanceHandler` calls :func:`log_provenance` when the engine starts; the
executed config is the one of the bundle parser that builds it (:func:`config_being_parsed`) or of the
``python -m monai.bundle run`` command line (:func:`executed_config_from_argv`) unless given.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import mlflow
import pandas as pd
from mlflow.data.meta_dataset import MetaDataset

from ambiseg_monai import __version__
from ambiseg_monai.reporting import naming

__all__ = [
    "CONFIG_PARAM_PREFIX",
    "flatten_config",
    "hyperparameters",
    "load_config",
    "config_files_from_argv",
    "executed_config_from_argv",
    "config_being_parsed",
    "parser_being_parsed",
    "datalist_sha256",
    "code_version",
    "git_describe",
    "git_commit",
    "provenance_tags",
    "source_tags",
    "mark_training_experiment",
    "DatalistDataset",
    "log_dataset_input",
    "log_provenance",
    "log_executed_config",
    "log_per_image_csv",
    "log_evaluation_results",
    "summarise_per_image",
]

#: First part of the param keys of the flattened config (``config.optimizer.lr``).
CONFIG_PARAM_PREFIX = "config"
_MAX_PARAM_KEY = 250
_MAX_PARAM_VALUE = 6000
_INVALID_NAME_CHARS = re.compile(r"[^\w./\- ]")


def _param_key(parts: Sequence[str]) -> str:
    # MLflow accepts alphanumerics, _ - . / and space in names (colons only outside Windows).
    key = ".".join(_INVALID_NAME_CHARS.sub("_", str(p)) or "_" for p in parts)
    return key[:_MAX_PARAM_KEY]


def _param_value(value: Any, json_scalars: bool = True) -> str:
    """The param string of a value: ``true``/``false``/``null`` JSON-spelled for the flattened config (as
    written), ``str(value)`` otherwise (as MONAI's ``MLFlowHandler`` logs its ``experiment_param``)."""
    text = json.dumps(value) if json_scalars and isinstance(value, (bool, type(None))) else str(value)
    if len(text) > _MAX_PARAM_VALUE:
        suffix = "...[truncated]"
        text = text[: _MAX_PARAM_VALUE - len(suffix)] + suffix
    return text


def _resolved_params(values: Mapping[str, Any]) -> dict[str, str]:
    return {_param_key([key]): _param_value(value, json_scalars=False) for key, value in values.items()}


def flatten_config(
    config: Mapping[str, Any], prefix: str = "", skip_keys: Sequence[str] = ("_meta_",)
) -> dict[str, str]:
    """Flatten a (bundle) config into MLflow params: nested keys joined with ``.``, list items by index.

    Values are kept as written in the config (``@`` references and ``$`` expressions included), so
    a param reads like the config line it comes from; ``true``/``false``/``null`` stay JSON-spelled.
    Empty dicts and lists are kept as ``{}`` / ``[]`` so that no configured key disappears.

    Args:
        config: the config dict (e.g. ``ConfigParser.get()`` or :func:`load_config`).
        prefix: first part of every key (``"config"`` -> ``config.optimizer.lr``); none when empty.
        skip_keys: top-level keys left out (the bundle metadata by default).

    Returns:
        dict param key -> value string, keys and values within MLflow's limits.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping (the parsed config dict), got {type(config).__name__}.")
    flat: dict[str, str] = {}

    def visit(node: Any, parts: list[str]) -> None:
        if isinstance(node, Mapping) and node:
            for key, child in node.items():
                visit(child, [*parts, str(key)])
        elif isinstance(node, (list, tuple)) and node:
            for index, child in enumerate(node):
                visit(child, [*parts, str(index)])
        else:
            flat[_param_key(parts)] = _param_value(node)

    for key, value in config.items():
        if key not in skip_keys:
            visit(value, [prefix, str(key)] if prefix else [str(key)])
    return flat


def load_config(config: Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike]) -> dict:
    """The merged config of one or several JSON/YAML files (later files override), or a dict as given."""
    if isinstance(config, Mapping):
        return dict(config)
    from monai.bundle import ConfigParser

    files = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing or not files:
        raise FileNotFoundError(f"config file(s) not found: {missing or 'none given'}.")
    return dict(ConfigParser.load_config_files([str(f) for f in files]))


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
            key, has_value, value = token[2:].partition("=")
            if not has_value:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if key == "config_file":
                parsed = _parse_value(value)
                files = [str(f) for f in (parsed if isinstance(parsed, (list, tuple)) else [value])]
            elif key not in ("meta_file", "logging_file", "args_file", "tracking"):
                overrides[key] = _parse_value(value)
        i += 1
    return files, overrides


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


def parser_being_parsed():
    """The ``monai.bundle`` ``ConfigParser`` that is instantiating the caller, or None when the caller is not
    being built from a bundle config.

    A component built from a bundle config (``"_target_": ...``) is created inside
    ``ConfigParser.get_parsed_content``; the parser is found on the call stack. Its values already resolved
    (e.g. ``num_raters``) can be read from it later with ``get_parsed_content`` at no cost.
    """
    from monai.bundle import ConfigParser

    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner
        frame = frame.f_back
    return None


def config_being_parsed() -> dict | None:
    """The config of the ``monai.bundle`` ``ConfigParser`` that is instantiating the caller, as JSON data; None
    when the caller is not being built from a bundle config.

    Its content is the config as it runs (see :func:`parser_being_parsed`): the config files merged, macros
    expanded, and the overrides applied, however the bundle was started (``python -m monai.bundle run``,
    ``monai.bundle.run(...)``, an ``args_file``).
    """
    parser = parser_being_parsed()
    return None if parser is None else json.loads(json.dumps(parser.get(), default=str))


_REFERENCE = "@"
_NOT_LITERAL = ("$", "%")  # expressions and macros: their value is known only to the running bundle


def _literal(value: Any, config: Mapping[str, Any], seen: tuple[str, ...] = ()) -> tuple[bool, Any]:
    """``(True, value)`` for a JSON scalar or a list of scalars, following ``@key`` references to other
    top-level keys; ``(False, None)`` for anything whose value needs the bundle to run."""
    if isinstance(value, str):
        if value.startswith(_NOT_LITERAL):
            return False, None
        if value.startswith(_REFERENCE):
            key = value[1:]
            if key in seen or key not in config or "#" in key or "::" in key:
                return False, None
            return _literal(config[key], config, (*seen, key))
        return True, value
    if value is None or isinstance(value, (bool, int, float)):
        return True, value
    if isinstance(value, (list, tuple)):
        items = [_literal(item, config, seen) for item in value]
        if all(ok and not isinstance(item, (list, tuple)) for ok, item in items):
            return True, [item for _, item in items]
    return False, None


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's hyperparameters: every top-level key of a bundle config whose value is known without running
    the bundle (a number, string, bool, null or list of those, or a ``@`` reference to such a key), by value.

    Keys whose value is a ``$`` expression (e.g. the dataset's rater count) or a component (a dict) are left
    out: pass their resolved values as ``params`` to :func:`log_provenance` /
    :class:`~ambiseg_monai.handlers.ProvenanceHandler` when a reader needs them.
    """
    found = {}
    for key, value in config.items():
        if str(key).startswith("_") or key == "imports":
            continue
        ok, resolved = _literal(value, config, (str(key),))
        if ok:
            found[str(key)] = resolved
    return found


def datalist_sha256(dataset: str | os.PathLike) -> str:
    """SHA-256 of a dataset's ``datalist.json`` content (canonical JSON: key order and spacing ignored).

    Two runs with the same hash saw the same dataset name, splits, items and paths. The image files
    themselves are not read (that would cost a pass over the whole dataset).

    Args:
        dataset: the dataset folder or the ``datalist.json`` path.
    """
    path = Path(dataset)
    if path.is_dir():
        path = path / "datalist.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no datalist.json to hash.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from error
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _checkout_git(*args: str) -> str | None:
    """Output of ``git <args>`` in the ambiseg-monai checkout this package runs from; None for an installed
    (non-checkout) package, without git, or when the command fails."""
    package = Path(__file__).resolve().parents[1]
    # GIT_OPTIONAL_LOCKS=0: read-only queries must not refresh (write) the index of the user's checkout.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=package, env=env, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        # a package installed into a virtual environment that lives inside some other repository
        # must not report that repository's version
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package.parent:
            return None
        return git(*args)
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def git_describe() -> str | None:
    """``git describe --always --tags`` of the ambiseg-monai checkout this package runs from, with
    ``-dirty`` when tracked files are modified; None for an installed (non-checkout) package or without git.
    """
    describe = _checkout_git("describe", "--always", "--tags")
    if not describe:
        return None
    dirty = _checkout_git("status", "--porcelain", "--untracked-files=no")
    return f"{describe}-dirty" if dirty else describe


@functools.cache
def git_commit() -> str | None:
    """The full commit hash (``git rev-parse HEAD``) of the ambiseg-monai checkout this package runs from; None
    for an installed (non-checkout) package or without git."""
    commit = _checkout_git("rev-parse", "HEAD")
    return commit if commit and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def code_version() -> str:
    """The package version, plus the git description when running from a checkout: ``0.1.0+a1b2c3d``."""
    describe = git_describe()
    return f"{__version__}+{describe}" if describe else __version__


def provenance_tags(
    dataset_dir: str | os.PathLike | None = None,
    bundle: str | None = None,
    run_kind: str | None = None,
) -> dict[str, str]:
    """The ``ambiseg.*`` tags of a run: code version, and when given, bundle, run kind and dataset
    (name from the datalist and its SHA-256)."""
    tags = {naming.TAG_CODE_VERSION: code_version()}
    describe = git_describe()
    if describe:
        tags[naming.TAG_GIT_DESCRIBE] = describe
    if bundle:
        tags[naming.TAG_BUNDLE] = str(bundle)
    if run_kind:
        if run_kind not in naming.RUN_KINDS:
            raise ValueError(f"run_kind {run_kind!r}: choose from {naming.RUN_KINDS}.")
        tags[naming.TAG_RUN_KIND] = run_kind
    if dataset_dir is not None:
        from ambiseg_monai.data.datalist import load_datalist

        tags[naming.TAG_DATASET] = str(load_datalist(dataset_dir)["name"])
        tags[naming.TAG_DATALIST_SHA256] = datalist_sha256(dataset_dir)
    return tags


def source_tags(config_files: Sequence[str | os.PathLike] = ()) -> dict[str, str]:
    """MLflow's own source tags of a run, which the MLflow UI shows in its "Source" field.

    - ``mlflow.source.type``: ``LOCAL``;
    - ``mlflow.source.name``: what was run: the first config file of the command line (e.g.
      ``bundles/cimd/configs/train.json``, as given), else the script (``sys.argv[0]``), as ``mlflow.start_run``
      names it;
    - ``mlflow.source.git.commit``: the commit of the ambiseg-monai checkout (:func:`git_commit`); left out when
      the package does not run from a git checkout.

    Runs started by MONAI's ``MLFlowHandler`` (``MlflowClient.create_run``) get none of these by themselves.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    files = [str(f) for f in config_files]
    name = files[0] if files else (sys.argv[0] or "python")
    tags = {MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_SOURCE_NAME: name}
    commit = git_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def mark_training_experiment(client: mlflow.MlflowClient, experiment: Any) -> bool:
    """Tag an experiment as a model-training experiment (runs, metrics, models), not a GenAI one (traces), with
    MLflow 3's experiment-kind tag: :data:`naming.TAG_EXPERIMENT_KIND` = :data:`naming.EXPERIMENT_KIND`.

    An experiment whose kind is already set (by a user, or in the UI) keeps it. Returns True when the tag was set.

    Args:
        client: MLflow client of the experiment's store.
        experiment: an ``mlflow.entities.Experiment`` (its tags are read from it) or an experiment id.
    """
    if isinstance(experiment, str):
        experiment = client.get_experiment(experiment)
    if naming.TAG_EXPERIMENT_KIND in (experiment.tags or {}):
        return False
    client.set_experiment_tag(experiment.experiment_id, naming.TAG_EXPERIMENT_KIND, naming.EXPERIMENT_KIND)
    return True


class DatalistDataset(MetaDataset):
    """A prepared dataset (the data contract's folder) as an MLflow dataset, for ``log_inputs``.

    What the MLflow UI shows for a run's dataset: the name (the dataset folder's name), the digest (the first 16
    hex digits of :func:`datalist_sha256`, the whole hash is the run tag ``ambiseg.datalist_sha256``), the source
    (the ``datalist.json`` path) and a profile (the datalist's ``name``, modality, rater count, image channels
    and the number of cases of each split). The images are not read.

    Args:
        dataset: the dataset folder or its ``datalist.json``.
    """

    def __init__(self, dataset: str | os.PathLike) -> None:
        # registered when mlflow.data is imported (one class per artifact store), unknown to type checkers
        from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]

        from ambiseg_monai.data.datalist import load_datalist

        path = Path(dataset)
        folder = path if path.is_dir() else path.parent
        datalist = load_datalist(folder)
        self._profile = {
            "datalist_name": str(datalist.get("name", folder.name)),
            **{key: datalist[key] for key in ("modality", "num_raters", "image_channels") if key in datalist},
            **{f"num_{split}": len(datalist.get(split) or []) for split in ("training", "validation", "test")},
        }
        source = LocalArtifactDatasetSource(str((folder / "datalist.json").resolve()))
        super().__init__(source=source, name=folder.resolve().name, digest=datalist_sha256(folder)[:16])

    @property
    def profile(self) -> dict[str, Any]:
        """The datalist's name, modality, rater count, image channels and the size of each split."""
        return dict(self._profile)

    def to_dict(self) -> dict[str, str]:
        """MLflow's dataset fields (name, digest, source, source type) and the profile, as JSON."""
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def log_dataset_input(
    client: mlflow.MlflowClient, run_id: str, dataset_dir: str | os.PathLike, context: str | None = None
) -> DatalistDataset:
    """Log a prepared dataset as an input of a run (``MlflowClient.log_inputs``, as ``mlflow.log_input`` does),
    with the input tag ``mlflow.data.context`` (``training``, ``evaluation``, ...). Logging the same dataset
    with the same context to a run again changes nothing (MLflow keeps one input per dataset and context)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = DatalistDataset(dataset_dir)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)] if context else []
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])
    return dataset


def log_executed_config(
    client: mlflow.MlflowClient,
    run_id: str,
    config: Mapping[str, Any],
    artifact_path: str = naming.CONFIG_ARTIFACT_DIR,
    filename: str = naming.EXECUTED_CONFIG_NAME,
) -> None:
    """Log the config as it ran (``config/executed_config.json``), so the run can be re-executed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path)


def log_provenance(
    client: mlflow.MlflowClient,
    run_id: str,
    config: Mapping[str, Any] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    dataset_dir: str | os.PathLike | None = None,
    bundle: str | None = None,
    run_kind: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    log_config_file: bool = True,
    params: Mapping[str, Any] | None = None,
    log_hyperparameters: bool = True,
) -> dict[str, str]:
    """Log hyperparameters, dataset identity, code version and the executed config to a run.

    Params, all from one place:

    - the config as written (``@`` references and ``$`` expressions unresolved), flattened under the
      ``config.`` prefix (``config.optimizer.lr``);
    - the resolved hyperparameters, unprefixed (``learning_rate``, ``max_epochs``): the config's top-level
      values known without running it (:func:`hyperparameters`) and the given ``params`` (resolved values the
      bundle computes, e.g. ``{"num_raters": "@num_raters"}`` in a config), written as MONAI's
      ``MLFlowHandler`` writes its ``experiment_param`` (``str(value)``).

    A param the run already has is not logged again (MLflow params are immutable: a second, different value
    would be an error), so a value logged first, e.g. by ``MLFlowHandler``, stays.

    Args:
        client: MLflow client of the run's tracking store.
        run_id: the run to log to.
        config: the executed config (a dict, or the config file(s) it was read from).
        dataset_dir: the dataset folder (its ``datalist.json`` is named and hashed).
        bundle: bundle name (tag ``ambiseg.bundle``).
        run_kind: one of :data:`naming.RUN_KINDS` (tag ``ambiseg.run_kind``).
        extra_tags: further tags.
        log_config_file: also log the config as ``config/executed_config.json``.
        params: further resolved values to log as unprefixed params.
        log_hyperparameters: log the config's top-level literal values as unprefixed params.

    Returns:
        the tags that were set.
    """
    tags = provenance_tags(dataset_dir, bundle, run_kind)
    tags.update({str(k): str(v) for k, v in (extra_tags or {}).items()})
    logged: dict[str, str] = {}
    if config is not None:
        config = load_config(config)
        logged.update(flatten_config(config, CONFIG_PARAM_PREFIX))
        if log_hyperparameters:
            logged.update(_resolved_params(hyperparameters(config)))
    logged.update(_resolved_params(params or {}))
    existing = client.get_run(run_id).data.params if logged else {}
    client.log_batch(
        run_id,
        params=[mlflow.entities.Param(k, v) for k, v in logged.items() if k not in existing],
        tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()],
    )
    if config is not None and log_config_file:
        log_executed_config(client, run_id, config)
    return tags


def _check_per_image_frame(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    if "case_id" not in frame.columns:
        raise ValueError(f"{source}: per-image table needs a 'case_id' column, has {list(frame.columns)}.")
    metrics = [c for c in frame.columns if c not in ("case_id", "num_samples")]
    if not metrics:
        raise ValueError(f"{source}: per-image table has no metric columns.")
    if frame.empty:
        raise ValueError(f"{source}: per-image table has no rows.")
    bad = [c for c in metrics if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise ValueError(f"{source}: metric columns {bad} are not numeric.")
    return frame


def summarise_per_image(frame: pd.DataFrame, num_samples: int, prefix: str = naming.EVALUATION_PREFIX) -> dict:
    """Run metrics of a per-image table: the mean over images of each metric column, keyed
    ``test_n<N>_<metric>`` (NaN values, e.g. an undefined metric on one image, are skipped)."""
    frame = _check_per_image_frame(frame, f"per-image table (N={num_samples})")
    metrics = [c for c in frame.columns if c not in ("case_id", "num_samples")]
    return {naming.evaluation_metric_key(m, num_samples, prefix): float(frame[m].mean()) for m in metrics}


def log_per_image_csv(
    client: mlflow.MlflowClient,
    run_id: str,
    csv_path: str | os.PathLike,
    num_samples: int | None = None,
    artifact_path: str | None = naming.PER_IMAGE_ARTIFACT_DIR,
) -> str:
    """Log a per-image metrics CSV as ``n<N>_per_image.csv`` (in ``artifact_path``; default the artifact
    root) and return its artifact path.

    The file is checked first (``case_id`` column, numeric metric columns); ``num_samples`` is read
    from the file name when not given.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: per-image CSV not found.")
    _check_per_image_frame(pd.read_csv(csv_path), str(csv_path))
    num_samples = num_samples if num_samples is not None else naming.parse_per_image_csv_name(csv_path.name)
    name = naming.per_image_csv_name(num_samples) if num_samples is not None else csv_path.name
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / name
        target.write_bytes(csv_path.read_bytes())
        client.log_artifact(run_id, str(target), artifact_path)
    return f"{artifact_path}/{name}" if artifact_path else name


def log_evaluation_results(
    client: mlflow.MlflowClient,
    run_id: str,
    per_image: Mapping[int, pd.DataFrame | str | os.PathLike],
    prefix: str = naming.EVALUATION_PREFIX,
) -> dict[str, float]:
    """Log a final evaluation: per-image CSVs (artifacts) and their means (run metrics), for each N.

    Args:
        client: MLflow client of the run's tracking store.
        run_id: the run to log to.
        per_image: number of samples N -> per-image table (DataFrame or CSV path) with a ``case_id``
            column and one column per metric.
        prefix: metric key prefix (``test``).

    Returns:
        the logged summary, key ``test_n<N>_<metric>`` -> mean over images.
    """
    if not per_image:
        raise ValueError("per_image is empty: give at least one number of samples and its per-image table.")
    summary: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for num_samples, table in per_image.items():
            frame = table if isinstance(table, pd.DataFrame) else pd.read_csv(table)
            summary.update(summarise_per_image(frame, int(num_samples), prefix))
            path = Path(tmp) / naming.per_image_csv_name(num_samples)
            frame.to_csv(path, index=False)
            log_per_image_csv(client, run_id, path, int(num_samples))
    client.log_batch(
        run_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in summary.items()]
    )
    return summary
