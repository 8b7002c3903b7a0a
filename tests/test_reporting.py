"""Comparison report, provenance and store helpers, on MLflow stores built with the MLflow API in tmp_path."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from ignite.engine import Engine, Events
from mlflow.entities import Metric
from monai.handlers import MLFlowHandler

from ambiseg_monai import cli
from ambiseg_monai.handlers import ProvenanceHandler
from ambiseg_monai.reporting import naming, plots
from ambiseg_monai.reporting.provenance import (
    datalist_sha256,
    executed_config_from_argv,
    flatten_config,
    hyperparameters,
    log_evaluation_results,
    log_provenance,
    summarise_per_image,
)
from ambiseg_monai.reporting.report import compare_runs, load_per_image_metrics, step_units
from ambiseg_monai.reporting.runs import RunSelection, select_runs
from ambiseg_monai.reporting.sync import main as sync_main
from ambiseg_monai.reporting.sync import sync_runs
from ambiseg_monai.reporting.table import (
    BEST_VALIDATION,
    FINAL_EVALUATION,
    comparison_table,
    evaluation_frame,
    format_mean_std,
    table_to_markdown,
)
from ambiseg_monai.reporting.tracking import (
    TrackingServerUnreachableWarning,
    pending_sync_file,
    probe_tracking_uri,
    resolve_tracking_uri,
)

METRICS = naming.REPORT_METRICS
# GED of image i in run r of a method: BASE[method] + 0.2 * i + 0.1 * r (+ 0.05 for N = 16);
# the other metrics are offsets of it so every column is distinct.
BASE = {"cimd": 0.1, "prob_unet": 0.3}
NUM_IMAGES = 4


def per_image_table(method: str, run: int, num_samples: int) -> pd.DataFrame:
    ged = BASE[method] + 0.2 * np.arange(NUM_IMAGES) + 0.1 * run + (0.05 if num_samples == 16 else 0.0)
    columns = {m: ged / (k + 2) + 0.01 * k for k, m in enumerate(METRICS)}
    columns["ged"] = ged
    return pd.DataFrame({"case_id": [f"case{i}" for i in range(NUM_IMAGES)], **columns})


def make_run(client, experiment_id, name, per_image=None, dataset="demo", curve=True):
    run_id = client.create_run(experiment_id, run_name=name, tags={naming.TAG_DATASET: dataset}).info.run_id
    if curve:
        for step in range(1, 5):
            client.log_metric(run_id, "train_loss", 1.0 / step, step=step)
    if per_image:
        log_evaluation_results(client, run_id, per_image)
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An initialised, empty MLflow SQLite store. Creating one runs MLflow's schema migrations (seconds);
    tests copy this file instead."""
    path = tmp_path_factory.mktemp("template") / "empty.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_store(empty_db, path) -> str:
    """Copy the empty store to ``path`` and return its tracking URI."""
    shutil.copyfile(empty_db, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_db):
    """Two methods (experiments ``cimd`` and ``prob_unet``), two evaluated runs each, one run on another
    dataset and one training-only run."""
    root = tmp_path_factory.mktemp("store")
    uri = fresh_store(empty_db, root / "mlruns.db")
    client = mlflow.MlflowClient(uri)
    artifacts = (root / "mlruns").as_uri()
    ids = {}
    for method in BASE:
        experiment_id = client.create_experiment(method, artifact_location=artifacts)
        for run in range(2):
            tables = {n: per_image_table(method, run, n) for n in naming.DEFAULT_SAMPLE_COUNTS}
            ids[(method, run)] = make_run(client, experiment_id, f"{method}_{run}", tables)
    other = client.get_experiment_by_name("cimd").experiment_id
    ids["other_dataset"] = make_run(client, other, "lidc_run", {4: per_image_table("cimd", 5, 4)}, dataset="lidc")
    ids["training_only"] = make_run(client, other, "train_only")
    return {"uri": uri, "root": root, "ids": ids}


# ---------------------------------------------------------------------------------------------- naming


def test_metric_key_round_trip_and_bad_names():
    assert naming.evaluation_metric_key("dmax", 16) == "test_n16_dmax"
    assert naming.parse_evaluation_metric_key("test_n16_dmax") == ("dmax", 16)
    assert naming.parse_evaluation_metric_key("train_loss") is None
    assert naming.parse_evaluation_metric_key("val_n4_ged") is None
    assert naming.per_image_csv_name(4) == "n4_per_image.csv"
    assert naming.parse_per_image_csv_name("n4_per_image.csv") == 4
    assert naming.parse_per_image_csv_name("eval/per_image_n16.csv") == 16
    assert naming.parse_per_image_csv_name("n4_summary.json") is None
    with pytest.raises(ValueError, match="num_samples"):
        naming.evaluation_metric_key("ged", 0)
    with pytest.raises(ValueError, match="metric name"):
        naming.evaluation_metric_key("GED n", 4)


# ------------------------------------------------------------------------------------------ provenance


def test_flatten_config_keys_values_and_limits():
    config = {
        "_meta_": {"version": "1"},
        "lr": 1e-4,
        "network_def": {"_target_": "Net", "channels": [32, 64], "norm": None, "amp": True},
        "empty": {},
        "train#handlers": "@x",
        "long": "y" * 7000,
    }
    flat = flatten_config(config)
    assert flat["lr"] == "0.0001"
    assert flat["network_def.channels.0"] == "32" and flat["network_def.channels.1"] == "64"
    assert flat["network_def.norm"] == "null" and flat["network_def.amp"] == "true"
    assert flat["network_def._target_"] == "Net" and flat["empty"] == "{}"
    assert flat["train_handlers"] == "@x"  # '#' is not allowed in MLflow names
    assert len(flat["long"]) == 6000 and flat["long"].endswith("[truncated]")
    assert not any(k.startswith("_meta_") for k in flat)
    assert flatten_config({"a": {"b": 1}}, prefix="config") == {"config.a.b": "1"}
    with pytest.raises(ValueError, match="mapping"):
        flatten_config(["not", "a", "dict"])


def test_datalist_hash_ignores_formatting_and_sees_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "datalist.json").write_text(json.dumps({"name": "x", "training": [1, 2]}))
    (tmp_path / "b" / "datalist.json").write_text(json.dumps({"training": [1, 2], "name": "x"}, indent=4))
    assert datalist_sha256(tmp_path / "a") == datalist_sha256(tmp_path / "b" / "datalist.json")
    (tmp_path / "b" / "datalist.json").write_text(json.dumps({"name": "x", "training": [2, 1]}))
    assert datalist_sha256(tmp_path / "a") != datalist_sha256(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="datalist.json"):
        datalist_sha256(tmp_path / "missing")


def test_summarise_per_image_means_and_bad_tables():
    frame = pd.DataFrame({"case_id": ["a", "b", "c"], "ged": [0.1, 0.2, np.nan], "ci": [1.0, 0.0, 0.5]})
    summary = summarise_per_image(frame, 4)
    assert summary == pytest.approx({"test_n4_ged": 0.15, "test_n4_ci": 0.5})
    with pytest.raises(ValueError, match="case_id"):
        summarise_per_image(frame.drop(columns="case_id"), 4)
    with pytest.raises(ValueError, match="not numeric"):
        summarise_per_image(frame.assign(ci=["x", "y", "z"]), 4)
    with pytest.raises(ValueError, match="no rows"):
        summarise_per_image(frame.iloc[:0], 4)


def test_log_provenance_params_tags_config(tmp_path, small_demo_dataset, empty_db):
    uri = fresh_store(empty_db, tmp_path / "p.db")
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("cimd", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "max_epochs", "3")  # logged by MLFlowHandler (resolved value): no collision
    config = {"max_epochs": "$@epochs", "epochs": 3, "optimizer": {"lr": 0.001}}
    tags = log_provenance(client, run_id, config, small_demo_dataset, bundle="cimd", run_kind="training",
                          params={"num_raters": 4})
    run = client.get_run(run_id)
    assert run.data.params == {"max_epochs": "3", "config.max_epochs": "$@epochs", "config.epochs": "3",
                               "config.optimizer.lr": "0.001", "epochs": "3", "num_raters": "4"}
    assert run.data.tags[naming.TAG_DATASET] == "demo"
    assert run.data.tags[naming.TAG_DATALIST_SHA256] == datalist_sha256(small_demo_dataset) == tags[naming.TAG_DATALIST_SHA256]
    assert run.data.tags[naming.TAG_BUNDLE] == "cimd" and run.data.tags[naming.TAG_RUN_KIND] == "training"
    assert run.data.tags[naming.TAG_CODE_VERSION].startswith("0.1.0")
    logged = json.loads(open(client.download_artifacts(run_id, "config/executed_config.json", str(tmp_path))).read())
    assert logged == config
    with pytest.raises(ValueError, match="run_kind"):
        log_provenance(client, run_id, run_kind="nonsense")


def test_provenance_handler_logs_into_the_mlflow_handler_run(tmp_path, small_demo_dataset, empty_db):
    uri = fresh_store(empty_db, tmp_path / "h.db")
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps({"lr": 0.01, "network_def": {"channels": [4, 8]}}))
    mlflow_handler = MLFlowHandler(tracking_uri=uri, experiment_name="cimd", close_on_complete=True,
                                   output_transform=lambda out: out["loss"])
    provenance = ProvenanceHandler(config=str(config_file), dataset_dir=small_demo_dataset,
                                   mlflow_handler=mlflow_handler, bundle="cimd", run_kind="training")
    engine = Engine(lambda e, batch: {"loss": float(batch)})
    provenance.attach(engine)  # attached before the MLflow handler: the run is started by provenance
    mlflow_handler.attach(engine)
    engine.run([1.0, 0.5], max_epochs=2)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cimd").experiment_id])
    assert run.data.params["config.lr"] == "0.01" and run.data.params["config.network_def.channels.1"] == "8"
    assert run.data.params["max_epochs"] == "2"
    assert run.data.tags[naming.TAG_DATASET] == "demo" and run.data.tags[naming.TAG_BUNDLE] == "cimd"
    assert [f.path for f in client.list_artifacts(run.info.run_id, "config")] == ["config/executed_config.json", "config/files"]
    assert [f.path for f in client.list_artifacts(run.info.run_id, "config/files")] == ["config/files/train.json"]
    with pytest.raises(FileNotFoundError, match="not_here"):
        ProvenanceHandler(config=str(tmp_path / "not_here.json"))


def test_hyperparameters_are_the_top_level_values_known_before_running():
    config = {
        "imports": ["$import torch"], "_meta_": {"version": "1"}, "bundle_name": "cimd", "experiment_name": "@bundle_name",
        "lr": 1e-3, "amp": True, "size": None, "channels": [8, 16], "mixed": [8, "$@x"], "levels": "@channels",
        "device": "$torch.device('cpu')", "raters": "@num_raters", "num_raters": "$len(@x)", "net": {"_target_": "Net"},
        "a": "@b", "b": "@a", "nested": "@net#_target_", "macro": "%other.json#key",
    }
    assert hyperparameters(config) == {"bundle_name": "cimd", "experiment_name": "cimd", "lr": 1e-3, "amp": True,
                                       "size": None, "channels": [8, 16], "levels": [8, 16]}


def test_provenance_handler_is_the_one_path_for_params_and_config_files(tmp_path, small_demo_dataset, empty_db,
                                                                         monkeypatch):
    """Command line -> params (resolved hyperparameters + config as written), executed config, config files;
    with ``log_config_file=False`` the same params and no config artifacts."""
    uri = fresh_store(empty_db, tmp_path / "one.db")
    base, overlay = tmp_path / "train.json", tmp_path / "lidc.json"
    base.write_text(json.dumps({"bundle_name": "cimd", "learning_rate": 0.01, "amp": True, "channels": [4, 8],
                                "num_raters": "$len([1, 2, 3])", "max_epochs": 5}))
    overlay.write_text(json.dumps({"channels": [8, 16]}))
    monkeypatch.setattr("sys.argv", ["monai.bundle", "run", "training", "--config_file", f"['{base}', '{overlay}']",
                                     "--learning_rate", "0.5"])
    runs = {}
    for name, handler_of in (
        ("provenance", lambda h: ProvenanceHandler(mlflow_handler=h, params={"num_raters": 3})),
        ("no_files", lambda h: ProvenanceHandler(mlflow_handler=h, log_config_file=False)),
    ):
        mlflow_handler = MLFlowHandler(tracking_uri=uri, experiment_name=name, output_transform=lambda out: None)
        engine = Engine(lambda e, batch: None)
        mlflow_handler.attach(engine)
        handler_of(mlflow_handler).attach(engine)
        engine.run([0], max_epochs=1)
        client = mlflow.MlflowClient(uri)
        (runs[name],) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    params = runs["provenance"].data.params
    assert params["learning_rate"] == "0.5" and params["config.learning_rate"] == "0.5"  # the override
    assert params["amp"] == "True" and params["config.amp"] == "true"  # MLFlowHandler's / the config's spelling
    assert params["channels"] == "[8, 16]" and params["config.channels.1"] == "16"  # the overlay
    assert params["num_raters"] == "3" and params["config.num_raters"] == "$len([1, 2, 3])"
    assert params["max_epochs"] == "1"  # logged first by MLFlowHandler (the engine's value): kept
    run_id = runs["provenance"].info.run_id
    artifacts = [a.path for a in client.list_artifacts(run_id, "config")]
    assert artifacts == ["config/executed_config.json", "config/files"]
    files = [a.path for a in client.list_artifacts(run_id, "config/files")]
    assert files == ["config/files/lidc.json", "config/files/train.json"]
    logged = json.loads(open(client.download_artifacts(run_id, "config/executed_config.json", str(tmp_path))).read())
    assert logged["channels"] == [8, 16] and logged["learning_rate"] == 0.5
    no_files = runs["no_files"]
    assert client.list_artifacts(no_files.info.run_id, "config") == []
    assert {k: v for k, v in no_files.data.params.items() if k != "num_raters"} == {
        k: v for k, v in params.items() if k != "num_raters"
    }
    assert naming.TAG_CODE_VERSION in no_files.data.tags


def test_provenance_handler_built_by_a_bundle_reads_the_config_being_parsed(monkeypatch):
    """``monai.bundle.run(...)`` from Python has no command line: the handler reads its parser's config."""
    from monai.bundle import ConfigParser

    monkeypatch.setattr("sys.argv", ["python"])
    config = {"lr": 0.1, "epochs": "@lr", "steps": "$@epochs * 2",
              "handler": {"_target_": "ambiseg_monai.handlers.ProvenanceHandler", "params": {"steps": "@steps"}}}
    parser = ConfigParser(config)
    parser.update({"lr": 0.5})
    handler = parser.get_parsed_content("handler")
    assert handler.config["lr"] == 0.5 and handler.config["steps"] == "$@epochs * 2"
    assert handler.params == {"steps": 1.0} and handler.config_files == []
    assert hyperparameters(handler.config) == {"lr": 0.5, "epochs": 0.5}
    assert ProvenanceHandler().config is None  # neither a bundle nor a command line


def test_executed_config_from_argv_applies_overrides(tmp_path):
    base, overlay = tmp_path / "train.json", tmp_path / "overlay.json"
    base.write_text(json.dumps({"lr": 0.1, "net": {"channels": 4}, "epochs": 2}))
    overlay.write_text(json.dumps({"epochs": 5}))
    argv = ["run", "training", "--config_file", f"['{base}', '{overlay}']", "--lr", "0.5", "--net#channels", "8"]
    assert executed_config_from_argv(argv) == {"lr": 0.5, "net": {"channels": 8}, "epochs": 5}
    assert executed_config_from_argv(["run"]) is None


# --------------------------------------------------------------------------------------------- table


def test_table_mean_std_hand_computed(store):
    client = mlflow.MlflowClient(store["uri"])
    runs = select_runs(client, RunSelection(dataset="demo"))
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    frame = evaluation_frame(runs, names)
    assert len(frame) == 2 * 2 * 2  # methods x runs x N; the training-only run has no evaluation row
    table = comparison_table(frame).set_index(["method", "num_samples"])
    # cimd, N=4: run means of GED are 0.1 + 0.3 = 0.4 and 0.5 -> mean 0.45, sample std 0.0707
    assert table.loc[("cimd", 4), "ged_mean"] == pytest.approx(0.45)
    assert table.loc[("cimd", 4), "ged_std"] == pytest.approx(math.sqrt(0.005))
    assert table.loc[("prob_unet", 16), "ged_mean"] == pytest.approx(0.3 + 0.3 + 0.05 + 0.05)
    assert (table["n_runs"] == 2).all()
    assert format_mean_std(0.5, float("nan")) == "0.500" and format_mean_std(float("nan"), 0.1) == "–"


def test_markdown_marks_best_per_metric(store):
    client = mlflow.MlflowClient(store["uri"])
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    table = comparison_table(evaluation_frame(select_runs(client, RunSelection(dataset="demo")), names))
    markdown = table_to_markdown(table, ["ged", "ci"])
    lines = markdown.strip().splitlines()
    assert lines[0] == "| Method | N | Runs | GED ↓ | CI ↑ |"
    # GED: cimd is lower (better); CI = GED / 3 + 0.01: prob_unet is higher (better)
    assert lines[2] == "| cimd | 4 | 2 | **0.450 ± 0.071** | 0.160 ± 0.024 |"
    assert lines[4] == "| prob_unet | 4 | 2 | 0.650 ± 0.071 | **0.227 ± 0.024** |"


def test_selection_errors_name_the_problem(store):
    client = mlflow.MlflowClient(store["uri"])
    with pytest.raises(ValueError, match=r"no experiment named \['phiseg'\].*cimd"):
        select_runs(client, RunSelection(experiments=["phiseg"]))
    with pytest.raises(ValueError, match="no run matches"):
        select_runs(client, RunSelection(dataset="qubiq"))
    with pytest.raises(ValueError, match="no run with id"):
        select_runs(client, RunSelection(run_ids=["0" * 32]))
    only = select_runs(client, RunSelection(run_ids=[store["ids"][("cimd", 1)]]))
    assert [r.info.run_name for r in only] == ["cimd_1"]
    training_only = select_runs(client, RunSelection(run_ids=[store["ids"]["training_only"]]))
    with pytest.raises(ValueError, match="test_n16_ged"):
        comparison_table(evaluation_frame(training_only, {}))


# ------------------------------------------------------------------------------------- whole report


def test_compare_runs_matches_per_image_csvs_and_logs_report(store, tmp_path):
    report = compare_runs(store["uri"], RunSelection(dataset="demo"), tmp_path / "out")
    assert report.source == FINAL_EVALUATION
    client = mlflow.MlflowClient(store["uri"])
    # recompute every cell from the per-image CSV artifacts: mean over images, then mean/std over runs
    per_run = []
    for key, run_id in store["ids"].items():
        if isinstance(key, tuple):
            images = load_per_image_metrics(client, run_id)
            means = images.drop(columns="case_id").groupby("num_samples").mean().reset_index()
            per_run.append(means.assign(method=key[0]))
    expected = pd.concat(per_run).groupby(["method", "num_samples"])
    table = report.table.set_index(["method", "num_samples"])
    for metric in METRICS:
        np.testing.assert_allclose(table[f"{metric}_mean"], expected[metric].mean().loc[table.index], rtol=1e-12)
        np.testing.assert_allclose(table[f"{metric}_std"], expected[metric].std().loc[table.index], rtol=1e-9)
    for part in ("markdown", "table_csv", "runs_csv", "bars", "vs_samples", "curves"):
        assert report.files[part].is_file(), part
        if report.files[part].suffix == ".png":
            assert report.files[part].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(report.files["table_csv"]).shape == (4, 3 + 2 * len(METRICS))
    assert sorted(report.curves["key"].unique()) == ["train_loss"]
    assert "![Training curves](training_curves.png)" in report.markdown
    logged = client.get_run(report.comparison_run_id)
    assert logged.data.tags[naming.TAG_RUN_KIND] == "comparison"
    assert set(logged.data.tags[naming.TAG_COMPARED_RUNS].split(",")) == {v for k, v in store["ids"].items() if k != "other_dataset"}
    artifacts = {f.path for f in client.list_artifacts(report.comparison_run_id, "report")}
    assert {"report/comparison.md", "report/comparison.csv", "report/metrics_bar.png"} <= artifacts
    # the comparison experiment is not itself compared by a later default selection
    comparisons = client.get_experiment_by_name(naming.COMPARISON_EXPERIMENT).experiment_id
    assert comparisons not in {r.info.experiment_id for r in select_runs(client, RunSelection())}


def test_cli_compare(store, tmp_path, capsys):
    out = tmp_path / "cli"
    status = cli.main(["compare", "--tracking-uri", store["uri"], "--experiment", "cimd", "--tag", "ambiseg.dataset=demo",
                       "--samples", "16", "--metrics", "ged,ci", "--out", str(out), "--no-log"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| cimd | 16 | 2 | 0.500 ± 0.071 | 0.177 ± 0.024 |" in printed
    assert "prob_unet" not in printed.split("## ")[0]
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["num_samples"]) == [16] and list(table.columns) == ["method", "num_samples", "n_runs", "ged_mean", "ged_std", "ci_mean", "ci_std"]
    assert cli.main(["compare", "--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--out", str(out)]) == 1
    assert "no MLflow store" in capsys.readouterr().err
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--tag", "novalue", "--out", str(out)]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--metrics", "ged,dice", "--out", str(out)]) == 1
    assert "unknown metric names ['dice']" in capsys.readouterr().err
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--metrics", "s_ncc", "--out", str(out)]) == 1
    assert "have no final evaluation metrics ['s_ncc'] (run metrics named like 'test_n16_s_ncc')" in capsys.readouterr().err


# ------------------------------------------------------------ right after training: no evaluation run yet

# validation GED of each training run at the epochs it validated (2 and 4; two iterations per epoch):
# cimd_0 is best at epoch 4, cimd_1 at 2, prob_unet_0 at 2, prob_unet_1 at 4
VALIDATION_GED = {
    ("cimd", 0): {2: 0.5, 4: 0.3},
    ("cimd", 1): {2: 0.2, 4: 0.4},
    ("prob_unet", 0): {2: 0.6, 4: 0.7},
    ("prob_unet", 1): {2: 0.9, 4: 0.5},
}
ITERATIONS = range(1, 9)


def validation_values(ged: float, epoch: int) -> dict[str, float]:
    """The validation metrics logged with a GED at an epoch: CI = 1 - GED, soft Dice = epoch / 10 (so a
    table built from each metric's own best epoch would differ from one built from GED's best epoch)."""
    return {"ged": ged, "ci": 1.0 - ged, "soft_dice": epoch / 10}


def make_training_run(client, experiment_id, method, index):
    """A training run as the bundles log it: loss and learning rate per iteration, validation metrics
    under bare names per epoch, the validation sample count as a parameter."""
    tags = {naming.TAG_DATASET: "demo", naming.TAG_RUN_KIND: "training"}
    run_id = client.create_run(experiment_id, run_name=f"{method}_{index}", tags=tags).info.run_id
    client.log_param(run_id, naming.VALIDATION_SAMPLES_PARAM, "4")
    for step in ITERATIONS:
        # prob_unet's loss is on another scale, with a spike: it must not flatten cimd's
        loss = 1.0 / step**2 if method == "cimd" else 100.0 + (4900.0 if step == 3 else 0.0)
        client.log_metric(run_id, "loss", loss, step=step)
        client.log_metric(run_id, "lr_group_0", 1e-3, step=step)
    for epoch, ged in VALIDATION_GED[(method, index)].items():
        for key, value in validation_values(ged, epoch).items():
            client.log_metric(run_id, key, value, step=epoch)
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def training_store(tmp_path_factory, empty_db):
    """Experiments ``cimd`` and ``prob_unet`` with two training runs each and no evaluation run."""
    root = tmp_path_factory.mktemp("training_store")
    uri = fresh_store(empty_db, root / "mlruns.db")
    client = mlflow.MlflowClient(uri)
    for method in BASE:
        experiment_id = client.create_experiment(method, artifact_location=(root / "mlruns").as_uri())
        for index in range(2):
            make_training_run(client, experiment_id, method, index)
    return {"uri": uri, "root": root}


def test_compare_after_training_uses_best_validation_metrics(training_store, tmp_path):
    report = compare_runs(training_store["uri"], RunSelection(), tmp_path / "out")
    assert report.source == BEST_VALIDATION
    # each run contributes every metric of its best-GED epoch
    best = {key: min(geds, key=geds.get) for key, geds in VALIDATION_GED.items()}
    per_run = pd.DataFrame(
        [{"method": m, **validation_values(VALIDATION_GED[(m, i)][e], e)} for (m, i), e in best.items()]
    ).groupby("method")
    table = report.table.set_index("method")
    assert list(table["num_samples"]) == [4, 4] and list(table["n_runs"]) == [2, 2]
    for metric in ("ged", "ci", "soft_dice"):
        np.testing.assert_allclose(table[f"{metric}_mean"], per_run[metric].mean().loc[table.index], rtol=1e-12)
        np.testing.assert_allclose(table[f"{metric}_std"], per_run[metric].std().loc[table.index], rtol=1e-9)
    assert table.loc["cimd", "soft_dice_mean"] == pytest.approx(0.3)  # epochs 4 and 2, not each metric's best
    assert dict(zip(report.runs["run_name"], report.runs["epoch"], strict=True)) == {
        f"{m}_{i}": e for (m, i), e in best.items()
    }
    # labelled in both CSVs, the Markdown and the plots' titles
    csv = pd.read_csv(report.files["table_csv"])
    assert list(csv.columns[:4]) == ["method", "source", "num_samples", "n_runs"]
    runs_csv = pd.read_csv(report.files["runs_csv"])
    assert set(csv["source"]) == set(runs_csv["source"]) == {"best validation (training run)"}
    head = report.markdown.split("\n## ")[0]
    assert "> **Source: best validation (training runs, validation split, N = 4 samples per image)**" in head
    assert "run each bundle's `evaluate.json` for final test metrics" in head
    assert "epoch with the best GED" in head and "Final evaluation metrics" not in head
    assert "| Method | Run | Run id | N | Best epoch |" in report.markdown
    assert "| cimd | 4 | 2 | 0.250 ± 0.071 | 0.750 ± 0.071 | 0.300 ± 0.141 |" in head.replace("**", "")
    client = mlflow.MlflowClient(training_store["uri"])
    assert client.get_run(report.comparison_run_id).data.params["source"] == BEST_VALIDATION
    # the training curves: per-iteration values apart from per-epoch ones
    units = report.curves.groupby("key")["unit"].unique().map(list).to_dict()
    assert units == {"loss": ["iteration"], "lr_group_0": ["iteration"], "ged": ["epoch"], "ci": ["epoch"],
                     "soft_dice": ["epoch"]}


def test_cli_compare_with_its_defaults_right_after_training(training_store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", "--tracking-uri", training_store["uri"], "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert "Source: best validation (training runs, validation split, N = 4 samples per image)" in printed
    assert "evaluate.json" in printed and "| prob_unet | 4 | 2 |" in printed
    assert (tmp_path / "comparison" / "comparison.csv").is_file()
    # no validation with 16 samples: the error says what was looked for
    assert cli.main(["compare", "--tracking-uri", training_store["uri"], "--samples", "16", "--no-log"]) == 1
    error = capsys.readouterr().err
    assert "no final evaluation metrics" in error
    assert "no validation metrics of a training run with [16] samples" in error


def test_compare_prefers_evaluation_runs_over_training_runs(training_store, tmp_path):
    """Once any selected run has final evaluation metrics, the training runs' validation values are left out
    (never mixed with test values) and the report is the evaluation's, as before."""
    mixed = tmp_path / "mixed.db"
    shutil.copyfile(training_store["root"] / "mlruns.db", mixed)
    client = mlflow.MlflowClient(f"sqlite:///{mixed}")
    evaluated = client.get_experiment_by_name("cimd").experiment_id
    run_id = client.create_run(evaluated, run_name="cimd_eval", tags={naming.TAG_DATASET: "demo"}).info.run_id
    for key, value in {"test_n4_ged": 0.11, "test_n16_ged": 0.12}.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    report = compare_runs(f"sqlite:///{mixed}", RunSelection(), tmp_path / "out", log_to_mlflow=False)
    assert report.source == FINAL_EVALUATION
    assert list(report.runs["run_name"]) == ["cimd_eval", "cimd_eval"] and "epoch" not in report.runs.columns
    assert "source" not in report.table.columns and "Source:" not in report.markdown
    assert report.markdown.split("\n## ")[0].count("Final evaluation metrics") == 1


def test_step_units_tell_iterations_from_epochs():
    def history(*steps):
        return [Metric("k", 1.0, 0, step) for step in steps]

    units = step_units({"loss": history(1, 2, 3, 4), "l_simple": history(1, 2, 3, 4), "ged": history(2, 4)})
    assert units == {"loss": "iteration", "l_simple": "iteration", "ged": "epoch"}
    # a run without a training loss (e.g. an evaluation's curve over generations): plain steps
    assert step_units({"soft_dice_vs_generations": history(1, 2, 3)}) == {"soft_dice_vs_generations": "step"}


def test_plots_label_units_methods_and_the_source(training_store, tmp_path, monkeypatch):
    figures = {}

    def keep(figure, path):
        figures[Path(path).name] = figure
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    compare_runs(training_store["uri"], RunSelection(), tmp_path / "out", log_to_mlflow=False)
    for name in ("metrics_bar.png", "metrics_vs_samples.png"):
        assert figures[name].get_suptitle().startswith("Best validation metrics of the training runs"), name
    curves = figures["training_curves.png"]
    panels = [(a.get_title(), a.get_xlabel(), a.get_yscale()) for a in curves.axes if a.get_visible()]
    # each method's loss in its own panel, on a log scale where it spans decades; validation metrics
    # shared, against epochs
    assert panels == [
        ("loss · cimd", "iteration", "log"),
        ("loss · prob_unet", "iteration", "log"),
        ("lr_group_0 · cimd", "iteration", "linear"),
        ("lr_group_0 · prob_unet", "iteration", "linear"),
        ("ged", "epoch", "linear"),
        ("ci", "epoch", "linear"),
        ("soft_dice", "epoch", "linear"),
    ]
    # the evaluation report's plots are titled as such
    table = pd.DataFrame({"method": ["a"], "num_samples": [16], "n_runs": [1], "ged_mean": [0.2], "ged_std": [np.nan]})
    assert plots.metric_bars_figure(table, ["ged"], "Final").get_suptitle() == "Final"
    assert plots.metric_vs_samples_figure(table, ["ged"]).get_suptitle() == ""


# ------------------------------------------------------------------------------- fallback and sync


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_probe_and_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert probe_tracking_uri(f"sqlite:///{tmp_path}/x.db") is None
    assert "does not exist" in probe_tracking_uri(f"sqlite:///{tmp_path}/missing/x.db")
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"
    with pytest.raises(ValueError, match="file store"):
        resolve_tracking_uri(str(tmp_path / "mlruns"))
    down = f"http://127.0.0.1:{_closed_port()}"
    assert "no answer" in probe_tracking_uri(down, timeout=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    with pytest.warns(TrackingServerUnreachableWarning, match="ambiseg_monai.reporting.sync"):
        uri = resolve_tracking_uri(timeout=1)
    assert uri == "sqlite:///mlruns-offline.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # MLFlowHandler reads the variable first
    note = (tmp_path / pending_sync_file(uri)).read_text()
    assert f"--to {down}" in note and f"sqlite:///{tmp_path}/mlruns-offline.db" in note


def test_unreachable_server_training_continues_then_syncs(tmp_path, monkeypatch, empty_db, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    down = f"http://127.0.0.1:{_closed_port()}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        uri = resolve_tracking_uri(down, offline_uri=f"sqlite:///{tmp_path}/offline.db", timeout=1)
    assert any(issubclass(w.category, TrackingServerUnreachableWarning) for w in caught)
    assert uri == fresh_store(empty_db, tmp_path / "offline.db")  # (a store that exists already, to save time)
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="cimd", close_on_complete=True,
                            output_transform=lambda out: out["loss"])
    engine = Engine(lambda e, b: {"loss": float(b)})
    handler.attach(engine)
    ran = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ran.append(e.state.epoch))
    engine.run([1.0, 0.5, 0.25], max_epochs=2)
    assert ran == [1, 2]  # training went on
    offline = mlflow.MlflowClient(uri)
    (run,) = offline.search_runs([offline.get_experiment_by_name("cimd").experiment_id])
    log = tmp_path / "log.txt"
    log.write_text("hello")
    offline.log_artifact(run.info.run_id, str(log), "notes")
    # import into the "server" (here another SQLite store); a second sync copies nothing twice
    target = fresh_store(empty_db, tmp_path / "server.db")
    (synced,) = sync_runs(uri, target)
    assert synced.copied and synced.experiment == "cimd"
    assert sync_main(argparse.Namespace(source=uri, destination=target, experiment=None)) == 0
    assert capsys.readouterr().out.strip() == "cimd: 0 run(s) copied, 1 already present"
    server = mlflow.MlflowClient(target)
    copy = server.get_run(synced.destination_run_id)
    assert copy.data.tags[naming.TAG_SYNCED_FROM] == run.info.run_id and copy.info.status == "FINISHED"
    assert copy.info.run_name == run.info.run_name
    assert [m.value for m in server.get_metric_history(copy.info.run_id, "Loss")] == [
        m.value for m in offline.get_metric_history(run.info.run_id, "Loss")] and len(server.get_metric_history(copy.info.run_id, "Loss")) == 6
    assert copy.data.params == run.data.params
    assert open(server.download_artifacts(copy.info.run_id, "notes/log.txt", str(tmp_path))).read() == "hello"
    with pytest.raises(ValueError, match="same store"):
        sync_runs(uri, uri)
