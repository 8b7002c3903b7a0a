"""The logged model served by ``mlflow models serve`` (issue #18): the documented REST request on 127.0.0.1 answers
with N masks and the mean and variance maps; a wrong image shape gets a 400 naming the expected shape.

Marked ``serving`` (it starts a server: about 15 s on 2 CPU cores); deselect with ``-m "not serving"``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _bundle_runner import REPO
from _tiny_mlflow_model import log_tiny_model

pytestmark = pytest.mark.serving

#: seconds the server may take to load the model and answer /ping
STARTUP_LIMIT = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _request(url: str, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _wait_until_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _request(f"{url}/ping")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping within {STARTUP_LIMIT} s:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """End the server's process group (the mlflow command and the uvicorn it starts), forcefully if need be."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # a worker that outlived the mlflow command
    except ProcessLookupError:
        pass


def test_served_model_answers_the_documented_request(small_demo_dataset, tmp_path):
    tiny = log_tiny_model("cimd", small_demo_dataset, tmp_path)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_command = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_command) if mlflow_command.exists() else "mlflow", "models", "serve"]
    command += ["-m", tiny.logged.model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tiny.tracking_uri,
        # the server is started as `exec uvicorn ...`: the environment's scripts must be on the PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    log = tmp_path / "serve.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_until_ready(url, server, log)
            images = np.linspace(0, 1, 2 * 16 * 16, dtype=np.float32).reshape(2, 1, 16, 16)
            # the body docs/deploy.md documents: a B x C x H x W list under "inputs", the sampler under "params"
            body = {"inputs": images.tolist(), "params": {"num_samples": 3, "num_inference_steps": 2, "seed": 1}}
            status, text = _request(f"{url}/invocations", body)
            assert status == 200, text[-2000:]
            predictions = json.loads(text)["predictions"]
            masks, mean, variance = (np.asarray(predictions[k]) for k in ("masks", "mean", "variance"))
            assert masks.shape == (2, 3, 16, 16) and set(np.unique(masks)) <= {0, 1}
            assert mean.shape == variance.shape == (2, 16, 16)
            np.testing.assert_allclose(mean, masks.mean(axis=1), atol=1e-6)
            np.testing.assert_allclose(variance, mean * (1 - mean), atol=1e-6)

            again = json.loads(_request(f"{url}/invocations", body)[1])["predictions"]
            assert again["masks"] == predictions["masks"]  # the same seed, the same masks

            status, text = _request(f"{url}/invocations", {"inputs": np.zeros((1, 1, 8, 8)).tolist()})
            assert status == 400 and "expected shape (-1, 1, 16, 16)" in text, text[-2000:]
            status, text = _request(f"{url}/invocations", {**body, "params": {"num_samples": 0}})
            assert status == 400 and "must be >= 1" in json.loads(text)["message"], text[-2000:]
        finally:
            _stop(server)
