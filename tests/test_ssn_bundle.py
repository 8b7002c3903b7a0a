"""bundles/ssn end to end on a tiny demo dataset: the training loss decreases; train -> resume -> evaluate ->
inference; ``ambiseg compare`` lists the method; export round trip and the deploy predictor; the overlays.

Every run is tiny (16 x 16 images, 8 training cases, a 2-level network) and logs to a temporary SQLite MLflow
store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import numpy as np
import pytest
import torch
from _bundle_runner import REPO, bundle_parser, latent_bundle_configs, link_bundles, mlflow_runs, run_bundle
from ignite.engine import Events

from ambiseg_monai import cli
from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.deploy.export import export_bundle
from ambiseg_monai.deploy.exported import ExportedLatentModel, load_exported_bundle
from ambiseg_monai.deploy.predictor import AmbiguousSlicePredictor
from ambiseg_monai.losses.ssn import StochasticSegmentationLoss
from ambiseg_monai.networks.ssn import StochasticSegmentationNetwork

CONFIGS = latent_bundle_configs("ssn")
SMALL = {"unet_channels": [8, 16], "num_res_units": 1, "num_head_convs": 1}
METRICS_LOGGED = ("ged", "ci", "dmax", "hm_iou", "sample_diversity", "truth_ged")


def _small_network() -> StochasticSegmentationNetwork:
    return StochasticSegmentationNetwork(channels=(8, 16), num_res_units=1, num_head_convs=1)


def _overrides(dataset: str, root: Path, **extra) -> dict:
    return {
        "dataset_dir": dataset, "demo_dir": None, "tracking_uri": f"sqlite:///{root / 'mlruns.db'}", **SMALL,
        "batch_size": 4, "max_epochs": 1, "val_interval": 1, **extra,
    }  # fmt: skip


def _run(run_id: str, overlays: list[str], dataset: str, root: Path, **extra):
    files = [str(CONFIGS / name) for name in ("train.json", *overlays)]
    return run_bundle(CONFIGS, files, run_id, _overrides(dataset, root, **extra), root)


@pytest.fixture(scope="module")
def trained(small_demo_dataset, tmp_path_factory):
    """One tiny training run (1 epoch, validated); returns (root folder, workflow)."""
    root = tmp_path_factory.mktemp("ssn")
    return root, _run("training", [], small_demo_dataset, root)


def test_training_loss_decreases(small_demo_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the bundle writes runs/ and mlruns.db relative to the working directory
    link_bundles(tmp_path)
    parser = bundle_parser(CONFIGS)
    parser.update(_overrides(small_demo_dataset, tmp_path, max_epochs=8, val_interval=100, log_mlflow_model=False))
    trainer = parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    torch.manual_seed(0)
    trainer.run()
    assert len(losses) == 16 and all(np.isfinite(losses))  # 8 epochs x 2 batches of 4
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    loss = parser.get_parsed_content("train#loss")
    assert isinstance(loss, StochasticSegmentationLoss) and loss.num_mc_samples == 20  # the paper's M
    assert set(loss.last_terms) == {"loss", "nll", "mean_nll", "l2"}


def test_training_writes_checkpoints_sample_grid_and_mlflow_metrics(trained):
    root, workflow = trained
    models = root / "runs" / "ssn" / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file()
    best = _small_network()
    best.load_state_dict(torch.load(models / "model.pt", weights_only=True))  # the best-GED network's weights
    assert list((root / "runs" / "ssn" / "samples").glob("*.png"))
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2  # 8 cases / batch 4
    (run,) = [r for r in mlflow_runs(root, "ssn") if not any(key.startswith("test_") for key in r.data.metrics)]
    metrics = run.data.metrics
    for name in (*METRICS_LOGGED, "loss", "nll", "mean_nll"):
        assert name in metrics and np.isfinite(metrics[name]), name
    assert 0.0 <= metrics["ged"] <= 2.0
    params = run.data.params
    assert (params["method"], params["rank"], params["num_mc_samples"], params["diagonal"]) == (
        "ssn",
        "10",
        "20",
        "False",
    )


def test_training_logs_an_mlflow_model_that_samples_the_bundle_way(trained):
    root, _ = trained
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    (logged,) = client.search_logged_models(experiment_ids=[client.get_experiment_by_name("ssn").experiment_id])
    model = mlflow.pyfunc.load_model(
        url2pathname(urlparse(logged.artifact_location).path), model_config={"device": "cpu"}
    )
    assert {p.name: p.default for p in model.metadata.signature.params.params} == {"num_samples": 16, "seed": 0}
    images = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    out = model.predict(images, params={"num_samples": 5, "seed": 1})
    assert out["masks"].shape == (2, 5, 16, 16) and set(np.unique(out["masks"])) <= {0, 1}
    np.testing.assert_allclose(out["mean"], out["masks"].mean(axis=1), atol=1e-6)


def test_training_resumes_from_the_last_epoch_checkpoint(small_demo_dataset, tmp_path):
    _run("training", [], small_demo_dataset, tmp_path, val_interval=10, log_mlflow_model=False)
    workflow = _run("training", [], small_demo_dataset, tmp_path, val_interval=10, max_epochs=2, log_mlflow_model=False)
    checkpointer = workflow.parser.get_parsed_content("train#handlers")[0]
    assert checkpointer.loaded_from is not None and checkpointer.loaded_from.name == "checkpoint_epoch=1.pt"
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 4)  # continued, not restarted


def test_evaluate_inference_and_compare(trained, small_demo_dataset, capsys):
    root, _ = trained
    _run("evaluating", ["evaluate.json"], small_demo_dataset, root)
    eval_dir = root / "runs" / "ssn" / "eval"
    for n in (4, 16):
        with open(eval_dir / f"n{n}_per_image.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [r["case_id"] for r in rows] == [f"demo_tes_{i:04d}" for i in range(4)]
        ged = np.array([float(r["ged"]) for r in rows])
        assert np.all((ged >= 0) & (ged <= 2))
        summary = json.loads((eval_dir / f"n{n}_summary.json").read_text())
        assert summary["ged"]["mean"] == pytest.approx(ged.mean(), abs=1e-5)
    (evaluation,) = [r for r in mlflow_runs(root, "ssn") if "test_n16_ged" in r.data.metrics]
    assert {"test_n4_ged", "test_n4_ci", "test_n16_hm_iou"} <= set(evaluation.data.metrics)

    _run("inferring", ["inference.json"], small_demo_dataset, root)
    out = root / "runs" / "ssn" / "inference"
    assert len(list(out.glob("*.nii.gz"))) == 4 * 3  # 4 test cases x (samples, mean, variance)
    samples, _ = load_channel_first_nifti(out / "demo_tes_0000_samples.nii.gz")
    mean, _ = load_channel_first_nifti(out / "demo_tes_0000_mean.nii.gz")
    assert samples.shape == (16, 16, 16) and set(np.unique(samples)) <= {0, 1}
    np.testing.assert_allclose(mean[0], samples.mean(0), atol=1e-6)

    capsys.readouterr()
    assert cli.main(["compare", "--tracking-uri", f"sqlite:///{root / 'mlruns.db'}", "--out", str(root / "report"),
                     "--no-log"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| ssn | 4 | 1 |" in printed and "| ssn | 16 | 1 |" in printed


def test_export_round_trip_and_deploy_predictor(trained, tmp_path):
    root, _ = trained
    overrides = {**SMALL, "num_inference_samples": 3}
    out = tmp_path / "model.ts"
    report = export_bundle(REPO / "bundles" / "ssn", out, ckpt_file=root / "runs" / "ssn" / "models" / "model.pt",
                           overrides=overrides, spatial_shape=(16, 16), check_sampling=True)  # fmt: skip
    assert report.kind == "latent" and report.max_abs_diff <= 1e-5 and report.sample_agreement == 1.0
    bundle = load_exported_bundle(out)
    assert isinstance(bundle.network, ExportedLatentModel) and bundle.network.traced_num_samples == 3
    assert bundle.export["network_class"] == "ambiseg_monai.networks.ssn.StochasticSegmentationNetwork"
    assert bundle.export["bundle_name"] == "ssn" and bundle.metadata["name"].startswith("Stochastic Segmentation")
    assert bundle.network.sample(torch.rand(2, 1, 16, 16), 5).shape == (2, 5, 16, 16)  # any N, any batch

    volume = np.random.default_rng(0).uniform(-1000, 400, size=(2, 16, 16)).astype(np.float32)  # HU
    prediction = AmbiguousSlicePredictor(out, batch_size=2).predict(volume)
    assert prediction.samples.shape == (2, 3, 16, 16) and set(np.unique(prediction.samples)) <= {0, 1}
    np.testing.assert_allclose(prediction.mean, prediction.samples.mean(axis=1), atol=1e-6)


@pytest.mark.deploy_sdk
def test_deploy_application_with_the_ssn_bundle(trained, tmp_path):
    """The exported SSN bundle in the MONAI Deploy application on the CT slice shipped with pydicom."""
    import pydicom
    from pydicom.data import get_testdata_file

    from ambiseg_monai.deploy.app import DeploySettings, run_application

    root, _ = trained
    model = tmp_path / "models" / "model.ts"
    export_bundle(REPO / "bundles" / "ssn", model, ckpt_file=root / "runs" / "ssn" / "models" / "model.pt",
                  overrides={**SMALL, "num_inference_samples": 3}, spatial_shape=(16, 16))  # fmt: skip
    (tmp_path / "dicom").mkdir()
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.save_as(tmp_path / "dicom" / "slice.dcm")
    out = tmp_path / "out"
    run_application(DeploySettings(input=tmp_path / "dicom", output=out, model=model.parent))
    segmentation = pydicom.dcmread(out / "seg.dcm")
    assert segmentation.Modality == "SEG" and segmentation.SegmentSequence[0].SegmentAlgorithmName == "ssn"
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["num_samples"] == 3 and summary["model"]["name"] == "ssn"


def test_lidc_overlay_holds_the_authors_settings():
    parser = bundle_parser(CONFIGS, "lidc.json")
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, StochasticSegmentationNetwork)
    assert network.channels == (32, 64, 128, 192, 192, 192, 192) and network.size_divisor == 64
    assert (network.num_classes, network.rank, network.epsilon, network.diagonal) == (2, 10, 1e-5, False)
    assert len([m for m in network.head if isinstance(m, torch.nn.Sequential)]) == 3  # three 1x1 recombinations
    loss = parser.get_parsed_content("train#loss")
    assert (loss.num_mc_samples, loss.antithetic, loss.l2_weight) == (20, False, 0.0)
    assert parser.get_parsed_content("batch_size") == 12 and parser.get_parsed_content("learning_rate") == 1e-3
    assert parser.get_parsed_content("output_dir") == "runs/ssn_lidc"
    assert network.eval().sample(torch.rand(1, 1, 128, 128), 2).shape == (1, 2, 128, 128)


def test_diagonal_overlay_drops_the_factor_and_keeps_its_own_outputs():
    parser = bundle_parser(CONFIGS, "diagonal.json")
    assert parser.get_parsed_content("network_def").cov_factor_head is None
    assert parser.get_parsed_content("output_dir") == "runs/ssn_diagonal"
    assert parser.get_parsed_content("provenance_params#diagonal") is True
