"""Run provenance and the tracking-server fallback, wired into real bundles.

The bundles run through their real command line (``python -m monai.bundle run ...``, executed in-process
with ``runpy`` and a patched ``sys.argv``), because the executed config that lands in MLflow is read from
that command line. Tiny settings: 1 epoch on the small demo dataset; CIMD with 20 diffusion steps.
"""

from __future__ import annotations

import json
import runpy
import socket
import sys
from pathlib import Path

import mlflow
import pytest
from _bundle_runner import SMALL_SETTINGS

from ambiseg_monai.data.datalist import load_datalist
from ambiseg_monai.reporting import code_version, datalist_sha256, naming
from ambiseg_monai.reporting.tracking import OFFLINE_URI_ENV, TrackingServerUnreachableWarning

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
COMMON = {"max_epochs": 1, "val_interval": 1, "batch_size": 4, "amp": False}
CIMD_TINY = {**COMMON, **SMALL_SETTINGS["cimd"]}
PROB_UNET_TINY = {**COMMON, "unet_channels": [8, 16], "kl_samples": 2}
EXECUTED_CONFIG = f"{naming.CONFIG_ARTIFACT_DIR}/{naming.EXECUTED_CONFIG_NAME}"


def run_bundle_cli(monkeypatch: pytest.MonkeyPatch, bundle: str, runner: str, config_files: list[str], overrides: dict):
    """``python -m monai.bundle run <runner> --config_file [...] --key value ...``, in this process."""
    configs = [str(BUNDLES / bundle / "configs" / f) for f in config_files]
    argv = ["monai.bundle", "run", runner, "--config_file", repr(configs), "--bundle_root", str(BUNDLES / bundle)]
    for key, value in overrides.items():
        argv += [f"--{key}", value if isinstance(value, str) else repr(value)]
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=False)


def only_run(uri: str, experiment: str, run_kind: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (run,) = [r for r in runs if r.data.tags.get(naming.TAG_RUN_KIND) == run_kind]
    return run


def executed_config(uri: str, run_id: str, tmp_path: Path) -> dict:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=EXECUTED_CONFIG, tracking_uri=uri,
                                                dst_path=str(tmp_path))
    return json.loads(Path(local).read_text(encoding="utf-8"))


def assert_provenance_tags(run: mlflow.entities.Run, bundle: str, run_kind: str, dataset: str) -> None:
    tags = run.data.tags
    assert tags[naming.TAG_BUNDLE] == bundle
    assert tags[naming.TAG_RUN_KIND] == run_kind
    assert tags[naming.TAG_DATASET] == load_datalist(dataset)["name"]
    assert tags[naming.TAG_DATALIST_SHA256] == datalist_sha256(dataset)
    assert len(tags[naming.TAG_DATALIST_SHA256]) == 64
    assert tags[naming.TAG_CODE_VERSION] == code_version()


@pytest.fixture(scope="module")
def cimd_store(tmp_path_factory, small_demo_dataset):
    """CIMD: one training run and one evaluation run, both from the command line, in one SQLite store."""
    root = tmp_path_factory.mktemp("cimd_provenance")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    overrides = {**CIMD_TINY, "dataset_dir": small_demo_dataset, "output_dir": str(root / "run"), "tracking_uri": uri}
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_bundle_cli(monkeypatch, "cimd", "training", ["train.json"], overrides)
        run_bundle_cli(monkeypatch, "cimd", "evaluating", ["train.json", "evaluate.json"], overrides)
    return uri


def test_cimd_training_run_has_provenance_and_executed_config(cimd_store, small_demo_dataset, tmp_path):
    run = only_run(cimd_store, "cimd", "training")
    assert_provenance_tags(run, "cimd", "training", small_demo_dataset)
    # the config as written, flattened, with the command line's overrides applied
    assert run.data.params["config.bundle_name"] == "cimd"
    assert run.data.params["config.max_epochs"] == "1" and run.data.params["config.unet_channels.1"] == "8"
    assert run.data.params["config.resolved_tracking_uri"] == (
        "$ambiseg_monai.reporting.resolve_tracking_uri(@tracking_uri)"
    )
    # the hyperparameters, unprefixed: the config's literals and the computed provenance_params
    params = run.data.params
    assert params["learning_rate"] == "0.0005" and params["batch_size"] == str(CIMD_TINY["batch_size"])
    assert params["seed"] == "0" and params["dataset_dir"] == str(small_demo_dataset)
    assert params["method"] == "cimd" and params["num_raters"] == "4"  # the padded rater count
    client = mlflow.MlflowClient(cimd_store)
    # one executed config, written by the one ProvenanceHandler
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config") if not a.is_dir] == [EXECUTED_CONFIG]
    config = executed_config(cimd_store, run.info.run_id, tmp_path)
    assert config["bundle_name"] == "cimd" and config["max_epochs"] == 1 and config["tracking_uri"] == cimd_store
    assert "evaluate" not in config  # training only: evaluate.json was not part of this run
    assert {"loss", "ged"} <= set(run.data.metrics)


def test_cimd_evaluation_run_has_provenance_and_executed_config(cimd_store, small_demo_dataset, tmp_path):
    run = only_run(cimd_store, "cimd", "evaluation")
    assert_provenance_tags(run, "cimd", "evaluation", small_demo_dataset)
    assert run.data.params["config.eval_split"] == "test" and run.data.params["config.eval_inference_steps"] == "2"
    # eval_provenance_params next to the config's literals (dataset_dir, seed)
    params = run.data.params
    assert params["mode"] == "evaluate" and params["split"] == "test" and params["inference_steps"] == "2"
    assert params["ckpt_path"].endswith("models/model.pt") and params["seed"] == "0"
    assert params["dataset_dir"] == str(small_demo_dataset)
    config = executed_config(cimd_store, run.info.run_id, tmp_path)
    # train.json and evaluate.json merged in order, plus the overrides
    assert config["eval_split"] == "test" and config["eval_inference_steps"] == 2 and config["bundle_name"] == "cimd"
    assert config["evaluate"]["provenance_handler"]["run_kind"] == "evaluation"
    # the evaluation itself still lands in the same run (the handler was added once, for N = 4 and N = 16)
    assert {"test_n4_ged", "test_n16_ged"} <= set(run.data.metrics)
    root_files = {a.path for a in mlflow.MlflowClient(cimd_store).list_artifacts(run.info.run_id)}
    assert {EXECUTED_CONFIG.split("/")[0], "n4_per_image.csv", "n16_per_image.csv"} <= root_files
    training = only_run(cimd_store, "cimd", "training")
    assert run.data.tags[naming.TAG_DATALIST_SHA256] == training.data.tags[naming.TAG_DATALIST_SHA256]


def test_prob_unet_training_falls_back_from_an_unreachable_server_with_provenance(
    small_demo_dataset, tmp_path, monkeypatch, recwarn
):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once the socket is closed
    offline = f"sqlite:///{tmp_path / 'offline.db'}"
    monkeypatch.setenv(OFFLINE_URI_ENV, offline)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = {**PROB_UNET_TINY, "dataset_dir": small_demo_dataset, "output_dir": str(tmp_path / "run"),
                 "tracking_uri": down}  # a plain --tracking_uri http://... override
    run_bundle_cli(monkeypatch, "prob_unet", "training", ["train.json"], overrides)

    assert any(issubclass(w.category, TrackingServerUnreachableWarning) for w in recwarn.list)
    assert down in (tmp_path / "offline.db.pending-sync.txt").read_text(encoding="utf-8")
    run = only_run(offline, "prob_unet", "training")
    assert run.info.status == "FINISHED"
    assert_provenance_tags(run, "prob_unet", "training", small_demo_dataset)
    assert run.data.params["config.tracking_uri"] == down  # the configured server is on record
    assert "loss" in run.data.metrics and "ged" in run.data.metrics
