"""A real ``mlflow server`` on a free loopback port (SQLite backend, served artifact store): training logs to
it over HTTP, an offline store is imported into it, and ``compare`` reads it back.

The server is started once for the module, waited for on ``/health`` with a bounded timeout, and its
whole process group is always terminated. Skipped only when the ``mlflow`` command is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from ambiseg_monai.handlers import ProvenanceHandler
from ambiseg_monai.reporting import naming
from ambiseg_monai.reporting.provenance import log_evaluation_results
from ambiseg_monai.reporting.report import compare_runs, load_per_image_metrics
from ambiseg_monai.reporting.runs import RunSelection
from ambiseg_monai.reporting.sync import sync_runs
from ambiseg_monai.reporting.tracking import probe_tracking_uri, resolve_tracking_uri

MLFLOW_CLI = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
# The server imports all of MLflow; on a loaded 2-core machine that alone can take a minute or more.
STARTUP_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(MLFLOW_CLI is None, reason="the mlflow command-line tool is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(root / "server.log", "w")
    command = [
        MLFLOW_CLI, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # a new session: the server's worker processes form one group, terminated together below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while probe_tracking_uri(uri, timeout=2) is not None:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {STARTUP_TIMEOUT_S} s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"uri": uri, "root": root}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        log.close()


def test_train_over_http_import_offline_and_compare(server, tmp_path, small_demo_dataset, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(server["uri"])
    assert uri == server["uri"]  # reachable: used as given

    # "training" with MONAI's MLFlowHandler + provenance, logged over HTTP
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="cimd", run_name="cimd_http", close_on_complete=False,
                            output_transform=lambda out: out["loss"])
    provenance = ProvenanceHandler(config={"lr": 0.01}, dataset_dir=small_demo_dataset, mlflow_handler=handler,
                                   bundle="cimd", run_kind="training")
    engine = Engine(lambda e, b: {"loss": float(b)})
    handler.attach(engine)
    provenance.attach(engine)
    engine.run([1.0, 0.5], max_epochs=3)
    run_id = handler.cur_run.info.run_id
    per_image = pd.DataFrame({"case_id": ["a", "b"], "ged": [0.2, 0.4], "ci": [0.7, 0.9]})
    log_evaluation_results(handler.client, run_id, {4: per_image, 16: per_image.assign(ged=[0.1, 0.3])})
    handler.close()

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["config.lr"] == "0.01"
    assert run.data.metrics["test_n4_ged"] == pytest.approx(0.3) and run.data.metrics["test_n16_ged"] == pytest.approx(0.2)
    assert run.data.tags[naming.TAG_DATASET] == "demo"
    assert [m.value for m in client.get_metric_history(run_id, "Loss")] == [1.0, 0.5] * 3
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # artifacts travel over HTTP too
    images = load_per_image_metrics(client, run_id)
    assert list(images["num_samples"]) == [4, 4, 16, 16]
    pd.testing.assert_frame_equal(images.iloc[:2].drop(columns="num_samples"), per_image)
    assert list((server["root"] / "artifacts").rglob("n16_per_image.csv"))

    # a run logged offline (the server was down) is imported
    offline_uri = f"sqlite:///{tmp_path}/offline.db"
    offline = mlflow.MlflowClient(offline_uri)
    experiment_id = offline.create_experiment("prob_unet", artifact_location=(tmp_path / "offline_artifacts").as_uri())
    offline_run = offline.create_run(experiment_id, run_name="offline", tags={naming.TAG_DATASET: "demo"}).info.run_id
    log_evaluation_results(offline, offline_run, {4: per_image.assign(ged=[0.5, 0.7]), 16: per_image})
    offline.set_terminated(offline_run)
    (synced,) = sync_runs(offline_uri, uri)
    assert client.get_run(synced.destination_run_id).data.metrics["test_n4_ged"] == pytest.approx(0.6)

    report = compare_runs(uri, RunSelection(dataset="demo"), tmp_path / "report", metrics=["ged", "ci"])
    table = report.table.set_index(["method", "num_samples"])
    assert table.loc[("cimd", 16), "ged_mean"] == pytest.approx(0.2)
    assert table.loc[("prob_unet", 4), "ged_mean"] == pytest.approx(0.6)
    artifacts = {f.path for f in client.list_artifacts(report.comparison_run_id, "report")}
    assert "report/comparison.md" in artifacts and "report/metrics_bar.png" in artifacts
