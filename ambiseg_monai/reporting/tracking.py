"""Which MLflow tracking store a run logs to, with a local fallback when a server is unreachable.

Bundles call :func:`resolve_tracking_uri` once, from a config expression::

    "tracking_uri": "$ambiseg_monai.reporting.resolve_tracking_uri('http://127.0.0.1:5000')"

A reachable store is returned unchanged. An unreachable ``http(s)://`` server is replaced by a local
SQLite store (``sqlite:///mlruns-offline.db`` in the working directory by default) with a warning,
so training goes on and nothing is lost; the warning and a ``<db>.pending-sync.txt`` file next to
the database give the command that imports the runs into the server later
(``python -m ambiseg_monai.reporting.sync``).

A server that fails *during* a run is handled by :class:`FailoverClient` (used by
``ambiseg_monai.handlers.GuardedMLFlowHandler``): every request to the server is bounded
(:data:`HTTP_LIMITS`: one retry, a 3 s timeout, so an outage costs seconds once instead of
MLflow's ~4 minutes of retries per request); from the first request that fails because the server
is down, the run goes on in the same local SQLite store, as a run tagged with the server's run id
(:data:`TAG_CONTINUES_RUN`) that holds what could not be sent and everything after it. The sync
command merges such a run into the server's run it continues.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_OFFLINE_TRACKING_URI",
    "OFFLINE_URI_ENV",
    "TrackingServerUnreachableWarning",
    "probe_tracking_uri",
    "resolve_tracking_uri",
    "sqlite_uri_path",
    "sqlite_store_lock",
    "open_tracking_client",
    "pending_sync_file",
    "record_pending_sync",
    "sync_command",
    "HTTP_LIMITS",
    "TAG_CONTINUES_RUN",
    "TAG_CONTINUES_URI",
    "bounded_http_requests",
    "is_tracking_outage",
    "FailoverClient",
]

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_OFFLINE_TRACKING_URI = "sqlite:///mlruns-offline.db"
#: Environment variable overriding the fallback store.
OFFLINE_URI_ENV = "AMBISEG_OFFLINE_TRACKING_URI"
#: MLflow's HTTP settings for requests made during a run (a variable you set yourself wins): one retry
#: (urllib3 waits 0 s before the first retry) and a 3 s timeout, so a dead server costs milliseconds once
#: (connection refused) and a hung one ~6 s once, instead of MLflow's default 7 retries with exponential
#: back-off (~4 minutes) for every request.
HTTP_LIMITS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
}
#: Tags of a run continued in the offline store after its server failed mid-run: the server's run id and URI.
TAG_CONTINUES_RUN = "ambiseg.continues_run"
TAG_CONTINUES_URI = "ambiseg.continues_uri"

logger = logging.getLogger(__name__)


class TrackingServerUnreachableWarning(UserWarning):
    """The configured MLflow server did not answer; the run is logged to a local store instead."""


def sqlite_uri_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths as SQLAlchemy reads them), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


@contextmanager
def sqlite_store_lock(uri: str, timeout: float = 300.0) -> Iterator[None]:
    """Hold an inter-process lock on a ``sqlite:///`` store while a client opens it (no-op for other URIs).

    A client that opens a new SQLite store creates its tables and runs MLflow's schema migrations; two
    processes doing that at once (two trainings started together on a fresh checkout) collide, and the
    second fails with ``sqlite3.OperationalError: table alembic_version already exists``. Under this lock
    the first process creates the store and the others find it ready. The lock file lives in the temporary
    folder, named after the database's absolute path, so nothing is added next to the user's store.

    Args:
        uri: the tracking URI about to be opened.
        timeout: seconds to wait for another process's initialisation before giving up.
    """
    database = sqlite_uri_path(uri)
    if database is None:
        yield
        return
    from filelock import FileLock, Timeout

    key = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:16]
    # mode 0o666: another user opening the same (shared) store can take the lock file this one created
    lock = FileLock(Path(tempfile.gettempdir()) / f"ambiseg-mlflow-store-{key}.lock", mode=0o666)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise TimeoutError(
            f"another process has been opening the MLflow store {database} for over {timeout:.0f} s "
            f"(lock {lock.lock_file}); if no such process is running, delete that lock file."
        ) from None
    try:
        yield
    finally:
        lock.release()


def open_tracking_client(uri: str) -> MlflowClient:
    """``mlflow.MlflowClient(uri)``, opened under :func:`sqlite_store_lock` so that a new store is created once."""
    import mlflow

    with sqlite_store_lock(uri):
        return mlflow.MlflowClient(uri)


def pending_sync_file(offline_uri: str) -> Path | None:
    """The note written next to an offline SQLite store listing the servers its runs belong to."""
    path = sqlite_uri_path(offline_uri)
    return None if path is None else path.with_name(path.name + ".pending-sync.txt")


def probe_tracking_uri(uri: str, timeout: float = 3.0) -> str | None:
    """Check that a tracking store can be used; return None when it can, else the reason.

    ``http(s)://`` servers are asked for ``/health`` (any HTTP answer below 500 counts as reachable:
    an auth-protected server that answers 401 is up). ``sqlite:///`` stores need their folder to
    exist. Other schemes (``databricks``, ``postgresql``, ...) are not probed.

    Args:
        uri: the tracking URI.
        timeout: seconds to wait for the server's answer.
    """
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            return f"no answer from {url}: {reason}"
        return None if status < 500 else f"{url} answered HTTP {status}"
    database = sqlite_uri_path(uri)
    if database is not None:
        folder = database.parent if str(database.parent) else Path(".")
        return None if folder.is_dir() else f"folder {folder} of the SQLite store does not exist"
    if scheme in ("", "file"):
        return f"{uri!r} is a file store, which MLflow 3 refuses; use sqlite:///<path>.db or http://host:port"
    return None


def resolve_tracking_uri(
    tracking_uri: str | None = None,
    offline_uri: str | None = None,
    timeout: float = 3.0,
) -> str:
    """The tracking URI to log to: ``tracking_uri`` when usable, else a local SQLite fallback.

    Args:
        tracking_uri: the configured store; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``.
        offline_uri: the fallback store; default ``$AMBISEG_OFFLINE_TRACKING_URI`` or
            ``sqlite:///mlruns-offline.db`` (relative to the working directory).
        timeout: seconds to wait for a server's answer.

    Returns:
        ``tracking_uri`` if the probe succeeds. Otherwise the fallback URI, after warning
        (:class:`TrackingServerUnreachableWarning`) with the import command, recording it in
        ``<offline db>.pending-sync.txt`` and, when the unreachable URI came from
        ``MLFLOW_TRACKING_URI``, pointing that variable to the fallback too (MONAI's
        ``MLFlowHandler`` gives the variable priority over its argument). A new SQLite store is created
        here (:func:`open_tracking_client`), so that runs started together do not race to create it.

    Raises:
        ValueError: when a local store is unusable (e.g. a file store or a missing folder): that is a
            configuration error, not an outage, and silently logging elsewhere would hide it.
    """
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri or env_uri or DEFAULT_TRACKING_URI
    reason = probe_tracking_uri(uri, timeout)
    if reason is None:
        if sqlite_uri_path(uri) is not None:
            open_tracking_client(uri)  # create a new store now, once, before the run's handlers open it
        return uri
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        raise ValueError(f"MLflow tracking URI {uri!r} is unusable: {reason}.")
    fallback = offline_uri or os.environ.get(OFFLINE_URI_ENV) or DEFAULT_OFFLINE_TRACKING_URI
    fallback_reason = probe_tracking_uri(fallback, timeout)
    if fallback_reason is not None:
        raise ValueError(
            f"MLflow server {uri} is unreachable ({reason}) and the fallback {fallback!r} is unusable too: "
            f"{fallback_reason}."
        )
    command = sync_command(fallback, uri)
    message = (
        f"MLflow tracking server {uri} is unreachable ({reason}). Logging to the local store {fallback} instead; "
        f"import the runs later with: {command}"
    )
    warnings.warn(message, TrackingServerUnreachableWarning, stacklevel=2)
    logger.warning(message)
    record_pending_sync(fallback, uri)
    if env_uri and env_uri == uri:
        os.environ["MLFLOW_TRACKING_URI"] = fallback
    open_tracking_client(fallback)
    return fallback


def sync_command(offline_uri: str, server_uri: str) -> str:
    """The command that imports the runs of an offline store into the server."""
    return f"python -m ambiseg_monai.reporting.sync --from {_absolute_sqlite(offline_uri)} --to {server_uri}"


def record_pending_sync(offline_uri: str, server_uri: str) -> str:
    """Add the sync command to ``<offline db>.pending-sync.txt`` (once) and return it."""
    command = sync_command(offline_uri, server_uri)
    note = pending_sync_file(offline_uri)
    if note is not None:
        known = note.read_text(encoding="utf-8").splitlines() if note.is_file() else []
        if command not in known:
            with open(note, "a", encoding="utf-8") as handle:
                handle.write(command + "\n")
    return command


def _absolute_sqlite(uri: str) -> str:
    path = sqlite_uri_path(uri)
    return uri if path is None else "sqlite:///" + str(path.resolve())


# ---------------------------------------------------------------------------------------------------
# mid-run failures
# ---------------------------------------------------------------------------------------------------
_ENV_LOCK = threading.Lock()


@contextmanager
def bounded_http_requests(limits: Mapping[str, str] | None = None) -> Iterator[None]:
    """Apply MLflow's HTTP retry/timeout variables (default :data:`HTTP_LIMITS`) for the duration of the block.

    MLflow reads them at every request, and has no per-client setting. A variable already set in the
    environment is left as it is; the others are removed again afterwards, so code outside the block
    (e.g. the sync command) keeps MLflow's defaults.
    """
    limits = HTTP_LIMITS if limits is None else limits
    with _ENV_LOCK:
        added = [name for name in limits if name not in os.environ]
        for name in added:
            os.environ[name] = str(limits[name])
    try:
        yield
    finally:
        with _ENV_LOCK:
            for name in added:
                os.environ.pop(name, None)


def is_tracking_outage(error: BaseException) -> bool:
    """True when ``error`` means the tracking server cannot be reached or failed (not a bad request).

    Outages: connection errors and timeouts (MLflow wraps them as ``MlflowException("API request to ...
    failed ...")``), HTTP 5xx answers and ``requests``/socket errors (artifact uploads). A 4xx answer
    (invalid parameter, missing run, permission) is the caller's error and is raised as usual.
    """
    import requests  # an MLflow dependency
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, RestException):
        return (error.get_http_status_code() or 0) >= 500
    if isinstance(error, MlflowException):
        text = str(error)
        if text.startswith("API request to"):
            code = _http_status(text)
            return code is None or code >= 500 or code in (408, 429)
        return False
    if isinstance(error, requests.exceptions.HTTPError):
        status = getattr(error.response, "status_code", None)
        return status is None or status >= 500
    if isinstance(error, requests.exceptions.RequestException):
        return True
    return isinstance(error, (ConnectionError, TimeoutError))  # socket.timeout is TimeoutError


def _http_status(text: str) -> int | None:
    marker = "failed with error code "
    if marker not in text:
        return None
    digits = text.split(marker, 1)[1][:3]
    return int(digits) if digits.isdigit() else None


def _short_reason(error: BaseException) -> str:
    text = str(error)
    for pattern, reason in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Name or service not known", "unknown host"),
        ("Max retries exceeded", "no answer"),
    ):
        if pattern in text:
            return reason
    code = _http_status(text)
    if code is not None:
        return f"HTTP {code}"
    if hasattr(error, "get_http_status_code"):
        return f"HTTP {error.get_http_status_code()}: {text[:120]}"
    return f"{type(error).__name__}: {text[:120]}"


def _artifact_location(offline_uri: str) -> str | None:
    path = sqlite_uri_path(offline_uri)
    return None if path is None else (path.resolve().parent / "mlruns").as_uri()


class _Failover:
    """What the clients of one run know about it, shared by them (the trainer's and the validator's handler)."""

    def __init__(self, server: str, offline_uri: str, experiment_name: str | None, run_name: str | None) -> None:
        self.server = server
        self.offline_uri = offline_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.client: MlflowClient | None = None  # the offline MlflowClient, once the server failed
        self.reason: str | None = None
        self.experiments: dict[str, str | None] = {}  # server experiment id -> name
        self.runs: dict[str, dict] = {}  # server run id -> what is needed to continue it offline
        self.run_map: dict[str, str] = {}  # server run id -> offline run id
        self.experiment_map: dict[str, str] = {}  # server experiment id -> offline experiment id
        self.offline_ids: set[str] = set()  # run and experiment ids of the offline store
        self.lock = threading.RLock()

    @property
    def offline(self) -> bool:
        return self.client is not None

    @property
    def offline_client(self) -> MlflowClient:
        """The offline store's client (only used once :meth:`go_offline` has switched)."""
        if self.client is None:
            raise RuntimeError(f"run {self.run_name!r} is not logged offline")
        return self.client

    # ------------------------------------------------------------------ what the server was told
    def remember(self, method: str, arguments: Mapping, result) -> None:
        from mlflow.entities import Experiment, Run

        if isinstance(result, Experiment):
            self.experiments[result.experiment_id] = result.name
        if method == "create_experiment" and isinstance(result, str):
            self.experiments[result] = arguments.get("name")
        if isinstance(result, Run):
            info = self._run(result.info.run_id)
            info.update(
                experiment_id=result.info.experiment_id,
                run_name=result.info.run_name,
                start_time=result.info.start_time,
            )
            info["tags"].update(result.data.tags)
            info["params"].update(result.data.params)
        run_id = arguments.get("run_id")
        if run_id is None or run_id not in self.runs:
            return
        info = self.runs[run_id]
        if method == "log_batch":
            info["params"].update({p.key: p.value for p in arguments.get("params") or ()})
            info["tags"].update({t.key: t.value for t in arguments.get("tags") or ()})
        elif method == "log_param":
            info["params"][arguments["key"]] = str(arguments["value"])
        elif method == "set_tag":
            info["tags"][arguments["key"]] = str(arguments["value"])

    def _run(self, run_id: str) -> dict:
        return self.runs.setdefault(
            run_id, {"experiment_id": None, "run_name": None, "start_time": None, "tags": {}, "params": {}}
        )

    # ------------------------------------------------------------------ switching to the offline store
    def go_offline(self, method: str, error: BaseException) -> None:
        with self.lock:
            if self.client is not None:
                return
            self.client = open_tracking_client(self.offline_uri)
            self.reason = f"{method}: {_short_reason(error)}"
            command = record_pending_sync(self.offline_uri, self.server)
            message = (
                f"MLflow tracking server {self.server} failed during the run ({self.reason}). "
                f"The rest of run {self.run_name!r} is logged to the local store {self.offline_uri} "
                f"and training goes on; import it into the server later with: {command}"
            )
            warnings.warn(message, TrackingServerUnreachableWarning, stacklevel=4)
            logger.warning(message)

    def experiment_id(self, server_id: str | None) -> str:
        """The offline experiment standing in for the server's experiment ``server_id``.

        ``None``: a run whose server experiment this client never saw; it goes to the experiment named
        ``experiment_name`` (else ``Default``) of the offline store.
        """
        if server_id is not None and server_id in self.offline_ids:
            return server_id
        key = server_id or ""
        if key not in self.experiment_map:
            name = self.experiments.get(key) or self.experiment_name or "Default"
            client = self.offline_client
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                offline_id = client.create_experiment(name, artifact_location=_artifact_location(self.offline_uri))
            else:
                offline_id = experiment.experiment_id
                if experiment.lifecycle_stage != "active":
                    client.restore_experiment(offline_id)
            self.experiment_map[key] = offline_id
            self.offline_ids.add(offline_id)
        return self.experiment_map[key]

    def run_id(self, server_id: str | None) -> str | None:
        """The offline run continuing the server's run ``server_id`` (created with its name, tags and params)."""
        from mlflow.entities import Param

        if server_id is None or server_id in self.offline_ids:
            return server_id
        if server_id not in self.run_map:
            info = self.runs.get(server_id) or self._run(server_id)
            tags = {k: v for k, v in info["tags"].items() if k != "mlflow.runName"}
            tags.update({TAG_CONTINUES_RUN: server_id, TAG_CONTINUES_URI: self.server})
            run = self.offline_client.create_run(
                self.experiment_id(info["experiment_id"]),
                start_time=info["start_time"],
                tags=tags,
                run_name=info["run_name"] or self.run_name,
            )
            if info["params"]:
                params = [Param(k, v) for k, v in info["params"].items()]
                self.offline_client.log_batch(run.info.run_id, params=params)
            self.run_map[server_id] = run.info.run_id
            self.offline_ids.add(run.info.run_id)
        return self.run_map[server_id]

    def call(self, method: str, bound: inspect.BoundArguments):
        """Call ``method`` on the offline store, with the server's run and experiment ids translated."""
        from mlflow.entities import Experiment, Run

        arguments = bound.arguments
        with self.lock:
            if arguments.get("run_id") is not None:
                arguments["run_id"] = self.run_id(arguments["run_id"])
            if arguments.get("experiment_id") is not None:
                arguments["experiment_id"] = self.experiment_id(arguments["experiment_id"])
            ids = arguments.get("experiment_ids")
            if isinstance(ids, str):
                arguments["experiment_ids"] = self.experiment_id(ids)
            elif ids is not None:
                arguments["experiment_ids"] = [self.experiment_id(i) for i in ids]
            if method == "create_experiment" and arguments.get("artifact_location") is None:
                arguments["artifact_location"] = _artifact_location(self.offline_uri)
        result = getattr(self.offline_client, method)(*bound.args, **bound.kwargs)
        found = result if isinstance(result, list) else [result]
        for item in found:
            if isinstance(item, Run):
                self.offline_ids.add(item.info.run_id)
            elif isinstance(item, Experiment):
                self.offline_ids.add(item.experiment_id)
        if method == "create_experiment" and isinstance(result, str):
            self.offline_ids.add(result)
        return result


_FAILOVERS: dict[tuple, _Failover] = {}


class FailoverClient:
    """An ``mlflow.MlflowClient`` stand-in that survives its tracking server failing mid-run.

    Every public client method goes to the server, with MLflow's HTTP retries and timeout bounded
    (:func:`bounded_http_requests`). When a call fails because the server is down
    (:func:`is_tracking_outage`), that call and every later one of the run go to the offline SQLite
    store instead, for the rest of the process: the server's run is continued there as a new run with the
    same name, experiment, tags and params, tagged with :data:`TAG_CONTINUES_RUN` (its server run id),
    and the sync command is recorded in ``<offline db>.pending-sync.txt``. Run and experiment ids of the
    server that callers still hold are translated. Other errors (bad requests) are raised as usual.

    The clients made for the same ``(tracking_uri, experiment_name, run_name)`` share one state, so the
    trainer's and the validator's MLflow handlers keep logging into one offline run.

    Args:
        client: the client of the server (e.g. the one ``MLFlowHandler`` made).
        tracking_uri: the server's URI.
        offline_uri: the local store; default ``$AMBISEG_OFFLINE_TRACKING_URI`` or ``sqlite:///mlruns-offline.db``.
        experiment_name: the run's experiment (used when the failure comes before the experiment is known).
        run_name: the run's name (identifies the run across clients).
        http_limits: MLflow HTTP variables to apply to each request; default :data:`HTTP_LIMITS`.
    """

    def __init__(
        self,
        client: MlflowClient,
        tracking_uri: str,
        offline_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        http_limits: Mapping[str, str] | None = None,
    ) -> None:
        offline_uri = offline_uri or os.environ.get(OFFLINE_URI_ENV) or DEFAULT_OFFLINE_TRACKING_URI
        reason = probe_tracking_uri(offline_uri)
        if sqlite_uri_path(offline_uri) is None or reason is not None:
            raise ValueError(
                f"the offline MLflow store {offline_uri!r} (used if {tracking_uri} fails during the run) is unusable: "
                f"{reason or 'it must be a sqlite:/// URI'}; "
                f"set {OFFLINE_URI_ENV} to sqlite:///<existing folder>/<name>.db"
            )
        self._online = client
        self._limits = dict(HTTP_LIMITS if http_limits is None else http_limits)
        key = (tracking_uri, experiment_name, run_name) if run_name else (tracking_uri, id(self))
        self._state = _FAILOVERS.setdefault(key, _Failover(tracking_uri, offline_uri, experiment_name, run_name))

    @property
    def offline(self) -> bool:
        """Whether the run is now logged to the offline store."""
        return self._state.offline

    @property
    def offline_uri(self) -> str:
        return self._state.offline_uri

    @property
    def failure(self) -> str | None:
        """What failed (``"<method>: <reason>"``), or None while the server is used."""
        return self._state.reason

    def offline_run_id(self, server_run_id: str) -> str | None:
        """The offline run continuing ``server_run_id`` (None when it was not continued offline)."""
        return self._state.run_map.get(server_run_id)

    def __getattr__(self, name: str):
        if name in ("_state", "_online", "_limits"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        active = self._state.client if self._state.offline else self._online
        value = getattr(active, name)
        if name.startswith("_") or not callable(value):
            return value
        return functools.partial(self._call, name)

    def _call(self, method: str, *args, **kwargs):
        # a class is hashable; mypy's Hashable protocol check of type objects says otherwise
        signature = _signature(type(self._online), method)  # type: ignore[arg-type]
        bound = signature.bind(*args, **kwargs)
        state = self._state
        if not state.offline:
            try:
                with bounded_http_requests(self._limits):
                    result = getattr(self._online, method)(*args, **kwargs)
            except Exception as error:
                if not is_tracking_outage(error):
                    raise
                state.go_offline(method, error)
            else:
                state.remember(method, bound.arguments, result)
                return result
        return state.call(method, bound)


@functools.cache
def _signature(cls: type, method: str) -> inspect.Signature:
    signature = inspect.signature(getattr(cls, method))
    return signature.replace(parameters=list(signature.parameters.values())[1:])  # without self
