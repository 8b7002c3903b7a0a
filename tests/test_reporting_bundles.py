"""End to end: short runs of two real bundles (CIMD and the Probabilistic U-Net) on demo data land in one
MLflow store, and ``ambiseg compare`` turns them into the table (checked against the per-image CSVs of
every evaluation run) and the plots. The bundles run in-process (``monai.bundle.run``) with tiny settings
(1 epoch; CIMD: 20 diffusion steps, 2 sampling steps), training then ``evaluate.json``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from monai.bundle import run as run_bundle

from ambiseg_monai import cli
from ambiseg_monai.data.datalist import load_split
from ambiseg_monai.reporting import naming
from ambiseg_monai.reporting.report import compare_runs, load_per_image_metrics
from ambiseg_monai.reporting.table import BEST_VALIDATION
from ambiseg_monai.reporting.tracking import TrackingServerUnreachableWarning

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
CIMD = BUNDLES / "cimd" / "configs"
COMMON = {"max_epochs": 1, "val_interval": 1, "batch_size": 4, "amp": False}
CIMD_TINY = {
    **COMMON,
    "num_train_timesteps": 20,
    "val_inference_steps": 2,
    "eval_inference_steps": 2,
    "unet_channels": [16, 16],
    "unet_norm_groups": 4,
    "network_def#denoiser#num_head_channels": 8,
}
# bundle (= experiment) -> tiny overrides
METHODS = {"cimd": CIMD_TINY, "prob_unet": {**COMMON, "unet_channels": [8, 16], "kl_samples": 2}}

pytestmark = pytest.mark.skipif(
    not all((BUNDLES / b / "configs" / "evaluate.json").is_file() for b in METHODS), reason="a bundle lacks evaluate.json"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_demo_dataset):
    root = tmp_path_factory.mktemp("bundles")
    uri = f"sqlite:///{root}/mlruns.db"
    overrides = {
        bundle: {**tiny, "bundle_root": str(BUNDLES / bundle), "dataset_dir": small_demo_dataset,
                 "output_dir": str(root / bundle), "tracking_uri": uri}
        for bundle, tiny in METHODS.items()
    }
    for bundle in METHODS:
        run_bundle("training", config_file=str(BUNDLES / bundle / "configs" / "train.json"), **overrides[bundle])
    # the natural first use: compare right after training, before any evaluation
    after_training = compare_runs(uri, out_dir=root / "after_training", log_to_mlflow=False)
    for bundle in METHODS:
        configs = BUNDLES / bundle / "configs"
        run_bundle("evaluating", config_file=[str(configs / "train.json"), str(configs / "evaluate.json")],
                   **overrides[bundle])
    return {"uri": uri, "root": root, "dataset": small_demo_dataset, "after_training": after_training}


def test_compare_right_after_training_reads_the_validation_metrics(store):
    report = store["after_training"]
    assert report.source == BEST_VALIDATION
    assert "Source: best validation (training runs, validation split, N = 4 samples per image)" in report.markdown
    client = mlflow.MlflowClient(store["uri"])
    table = report.table.set_index("method")
    assert sorted(table.index) == sorted(METHODS) and (table["num_samples"] == 4).all()
    for row in report.runs.itertuples():
        assert row.epoch == 1  # one epoch, validated once
        (ged,) = client.get_metric_history(row.run_id, "ged")
        assert table.loc[row.method, "ged_mean"] == pytest.approx(ged.value)


def test_each_sample_grid_is_logged_once(store):
    client = mlflow.MlflowClient(store["uri"])
    for bundle in METHODS:
        runs = client.search_runs([client.get_experiment_by_name(bundle).experiment_id])
        by_kind = {run.data.tags[naming.TAG_RUN_KIND]: run.info.run_id for run in runs}
        training = {a.path for a in client.list_artifacts(by_kind["training"], "samples")}
        assert "samples/samples_epoch0001.png" in training
        # evaluation: the grids and plots land once, with the evaluation folder, at the artifact root
        evaluation = {a.path for a in client.list_artifacts(by_kind["evaluation"])}
        assert {"n4_samples.png", "n16_samples.png"} <= evaluation, evaluation
        assert {"n4_mode_frequencies.png", "n16_mode_frequencies.png"} <= evaluation, evaluation  # not _epoch0001
        assert not {"samples", "truth"} & evaluation, evaluation


def test_compare_two_bundle_runs(store, capsys):
    out = store["root"] / "report"
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cimd | 4 | 1 |" in printed and "| prob_unet | 16 | 1 |" in printed

    table = pd.read_csv(out / "comparison.csv").set_index(["method", "num_samples"])
    assert sorted(table.index) == [(m, n) for m in sorted(METHODS) for n in naming.DEFAULT_SAMPLE_COUNTS]
    client = mlflow.MlflowClient(store["uri"])
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["method"].unique()) == sorted(METHODS) and (runs.groupby("method")["run_id"].nunique() == 1).all()
    for (method, num_samples), row in table.iterrows():
        (run_id,) = runs.loc[(runs["method"] == method) & (runs["num_samples"] == num_samples), "run_id"]
        images = load_per_image_metrics(client, run_id).query("num_samples == @num_samples")
        assert list(images["case_id"]) == [item["case_id"] for item in load_split(store["dataset"], "test")]
        for metric in naming.REPORT_METRICS:
            # one run per method: the table's mean is that run's mean over the test images (CSV: 6 decimals)
            assert row[f"{metric}_mean"] == pytest.approx(images[metric].mean(), abs=1e-6), (method, num_samples, metric)
            assert np.isnan(row[f"{metric}_std"])
            assert 0.0 <= row[f"{metric}_mean"] <= (2.0 if metric == "ged" else 1.0)
    # the methods' numbers differ, so a mix-up between runs and methods would show
    assert table.loc[("cimd", 16), "ged_mean"] != table.loc[("prob_unet", 16), "ged_mean"]
    for png in ("metrics_bar.png", "metrics_vs_samples.png", "training_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    comparison = client.get_experiment_by_name(naming.COMPARISON_EXPERIMENT)
    (logged,) = client.search_runs([comparison.experiment_id])
    assert "report/comparison.md" in {f.path for f in client.list_artifacts(logged.info.run_id, "report")}


def test_bundle_training_survives_an_unreachable_server(tmp_path, small_demo_dataset, recwarn):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once the socket is closed
    offline = f"sqlite:///{tmp_path}/offline.db"
    # the one config expression a bundle needs for the fallback
    tracking = f"$ambiseg_monai.reporting.resolve_tracking_uri('{down}', offline_uri='{offline}', timeout=1)"
    run_bundle("training", config_file=str(CIMD / "train.json"), **{
        **CIMD_TINY, "val_interval": 2, "bundle_root": str(REPO / "bundles" / "cimd"), "dataset_dir": small_demo_dataset,
        "output_dir": str(tmp_path / "out"), "tracking_uri": tracking, "experiment_name": "cimd",
        "imports": json.loads((CIMD / "train.json").read_text())["imports"] + ["$import ambiseg_monai.reporting"],
    })
    assert any(issubclass(w.category, TrackingServerUnreachableWarning) for w in recwarn.list)
    client = mlflow.MlflowClient(offline)
    (run,) = client.search_runs([client.get_experiment_by_name("cimd").experiment_id])
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "loss")) == 2
    assert (tmp_path / "out" / "models").is_dir()  # the checkpoint was written: training ran to the end
