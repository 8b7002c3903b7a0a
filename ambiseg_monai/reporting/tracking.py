"""Which MLflow tracking store a run logs to, with a local fallback when a server is unreachable.

Bundles call :func:`resolve_tracking_uri` once, from a config expression::

    "tracking_uri": "$ambiseg_monai.reporting.resolve_tracking_uri('http://127.0.0.1:5000')"

A reachable store is returned unchanged. An unreachable ``http(s)://`` server is replaced by a local
SQLite store (``sqlite:///mlruns-offline.db`` in the working directory by default) with a warning,
so training goes on and nothing is lost; the warning and a ``<db>.pending-sync.txt`` file next to
the database give the command that imports the runs into the server later
(``python -m ambiseg_monai.reporting.sync``).
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_OFFLINE_TRACKING_URI",
    "OFFLINE_URI_ENV",
    "TrackingServerUnreachableWarning",
    "probe_tracking_uri",
    "resolve_tracking_uri",
    "sqlite_uri_path",
    "pending_sync_file",
]

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
DEFAULT_OFFLINE_TRACKING_URI = "sqlite:///mlruns-offline.db"
#: Environment variable overriding the fallback store.
OFFLINE_URI_ENV = "AMBISEG_OFFLINE_TRACKING_URI"

logger = logging.getLogger(__name__)


class TrackingServerUnreachableWarning(UserWarning):
    """The configured MLflow server did not answer; the run is logged to a local store instead."""


def sqlite_uri_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths as SQLAlchemy reads them), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


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
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as error:
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
        ``MLFlowHandler`` gives the variable priority over its argument).

    Raises:
        ValueError: when a local store is unusable (e.g. a file store or a missing folder): that is a
            configuration error, not an outage, and silently logging elsewhere would hide it.
    """
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri or env_uri or DEFAULT_TRACKING_URI
    reason = probe_tracking_uri(uri, timeout)
    if reason is None:
        return uri
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        raise ValueError(f"MLflow tracking URI {uri!r} is unusable: {reason}.")
    fallback = offline_uri or os.environ.get(OFFLINE_URI_ENV) or DEFAULT_OFFLINE_TRACKING_URI
    fallback_reason = probe_tracking_uri(fallback, timeout)
    if fallback_reason is not None:
        raise ValueError(f"MLflow server {uri} is unreachable ({reason}) and the fallback {fallback!r} is unusable too: {fallback_reason}.")
    command = f"python -m ambiseg_monai.reporting.sync --from {_absolute_sqlite(fallback)} --to {uri}"
    message = (
        f"MLflow tracking server {uri} is unreachable ({reason}). Logging to the local store {fallback} instead; "
        f"import the runs later with: {command}"
    )
    warnings.warn(message, TrackingServerUnreachableWarning, stacklevel=2)
    logger.warning(message)
    note = pending_sync_file(fallback)
    if note is not None:
        with open(note, "a", encoding="utf-8") as handle:
            handle.write(command + "\n")
    if env_uri and env_uri == uri:
        os.environ["MLFLOW_TRACKING_URI"] = fallback
    return fallback


def _absolute_sqlite(uri: str) -> str:
    path = sqlite_uri_path(uri)
    return uri if path is None else "sqlite:///" + str(path.resolve())
