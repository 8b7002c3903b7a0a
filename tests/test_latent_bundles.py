"""End-to-end tests shared by the latent-model bundles (bundles/prob_unet, bundles/phiseg): train -> resume ->
evaluate -> inference on a tiny demo dataset, and the clear errors. Method-specific checks (loss terms, latent
families, dataset overlays) live in test_prob_unet_bundle.py and test_phiseg_bundle.py.

Every run is tiny (16 x 16 images, 8 training cases, a 2-3 level network, 1-2 epochs) and logs to a temporary
SQLite MLflow store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _bundle_runner import bundle_parser, latent_bundle_configs, latent_overrides, mlflow_runs, run_bundle
from monai.bundle import ConfigWorkflow

from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.networks.phiseg import PHiSeg
from ambiseg_monai.networks.prob_unet import ProbabilisticUNet

METHODS = ("prob_unet", "phiseg")
METRICS_LOGGED = ("ged", "ci", "dmax", "combined_sensitivity", "diversity_agreement", "sample_diversity")
# the networks of latent_overrides' small settings, to load the saved weights into
SMALL_NETWORKS = {
    "prob_unet": lambda: ProbabilisticUNet(channels=(8, 16), num_res_units=1),
    "phiseg": lambda: PHiSeg(channels=(8, 16, 16), latent_levels=2, convs_per_level=1),
}


def _check_prob_unet_training(loss, run) -> None:
    assert set(loss.last_terms) == {"loss", "reconstruction", "kl", "l2"}
    assert loss.last_terms["kl"] >= 0 and loss.last_terms["reconstruction"] > 0
    for term in ("loss", "reconstruction", "kl", "l2"):  # training loss terms, every iteration
        assert term in run.data.metrics, term
    assert run.data.params["latent_distribution"].endswith("AxisAlignedGaussian")


def _check_phiseg_training(loss, run) -> None:
    levels = {f"{term}_level{l}" for term in ("kl", "reconstruction") for l in range(2)}
    assert set(loss.last_terms) == {"loss", "reconstruction", "kl", "l2"} | levels
    terms = loss.last_terms
    assert terms["kl"] == pytest.approx(terms["kl_level0"] + 4 * terms["kl_level1"], rel=1e-5)  # KL weight 4^l
    level_sum = terms["reconstruction_level0"] + terms["reconstruction_level1"]
    assert terms["reconstruction"] == pytest.approx(level_sum, rel=1e-5)  # every level reconstructs the mask
    for term in ("loss", "reconstruction", "kl", "kl_level0", "kl_level1", "reconstruction_level1"):
        assert term in run.data.metrics, term  # training loss terms, every iteration
    assert run.data.params["latent_levels"] == "2"


CHECK_TRAINING = {"prob_unet": _check_prob_unet_training, "phiseg": _check_phiseg_training}


def _run(method: str, run_id: str, overlays: list[str], dataset: str, root: Path, **extra) -> ConfigWorkflow:
    """Run ``bundles/<method>``'s train.json + ``overlays`` with the small settings, outputs under ``root``."""
    configs = latent_bundle_configs(method)
    files = [str(configs / name) for name in ("train.json", *overlays)]
    return run_bundle(configs, files, run_id, latent_overrides(method, dataset, root, **extra), root)


@pytest.fixture(scope="module", params=METHODS)
def trained(request, small_demo_dataset, tmp_path_factory):
    """One tiny training run (1 epoch, validated) per method; returns (method, root folder, workflow)."""
    method = request.param
    root = tmp_path_factory.mktemp(method)
    workflow = _run(method, "training", [], small_demo_dataset, root)
    return method, root, workflow


def test_training_writes_checkpoints_sample_grid_and_mlflow_metrics(trained):
    method, root, workflow = trained
    models = root / "runs" / method / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file()
    assert (models / "model.pt").is_file()
    best = SMALL_NETWORKS[method]()
    best.load_state_dict(torch.load(models / "model.pt", weights_only=True))  # the best-GED network's weights
    assert list((root / "runs" / method / "samples").glob("*.png"))

    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2  # 8 cases / batch 4

    (run,) = [r for r in mlflow_runs(root, method) if not any(key.startswith("test_") for key in r.data.metrics)]
    metrics = run.data.metrics
    for name in METRICS_LOGGED:
        assert name in metrics and np.isfinite(metrics[name]), name
    assert 0.0 <= metrics["ged"] <= 2.0
    assert 0.0 <= metrics["ci"] <= 1.0
    assert run.data.params["method"] == method
    CHECK_TRAINING[method](workflow.parser.get_parsed_content("train#loss"), run)


@pytest.mark.parametrize("method", METHODS)
def test_training_resumes_from_the_last_epoch_checkpoint(method, small_demo_dataset, tmp_path):
    _run(method, "training", [], small_demo_dataset, tmp_path, val_interval=10)
    models = tmp_path / "runs" / method / "models"
    first = torch.load(models / "checkpoint_epoch=1.pt", weights_only=False)
    workflow = _run(method, "training", [], small_demo_dataset, tmp_path, val_interval=10, max_epochs=2)
    checkpointer = workflow.parser.get_parsed_content("train#handlers")[0]
    assert checkpointer.loaded_from is not None and checkpointer.loaded_from.name == "checkpoint_epoch=1.pt"
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 4)  # continued, not restarted
    assert (models / "checkpoint_epoch=2.pt").is_file()
    second = torch.load(models / "checkpoint_epoch=2.pt", weights_only=False)
    assert second["trainer"]["iteration"] == 4 and first["trainer"]["iteration"] == 2


def test_evaluate_writes_per_image_tables_for_4_and_16_samples(trained, small_demo_dataset):
    method, root, _ = trained
    _run(method, "evaluating", ["evaluate.json"], small_demo_dataset, root)
    eval_dir = root / "runs" / method / "eval"
    for n in (4, 16):
        with open(eval_dir / f"n{n}_per_image.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [r["case_id"] for r in rows] == [f"demo_tes_{i:04d}" for i in range(4)]
        ged = np.array([float(r["ged"]) for r in rows])
        assert np.all((ged >= 0) & (ged <= 2))
        summary = json.loads((eval_dir / f"n{n}_summary.json").read_text())
        assert summary["ged"]["num_images"] == 4
        assert summary["ged"]["mean"] == pytest.approx(ged.mean(), abs=1e-5)
        assert list(eval_dir.glob(f"n{n}_samples*.png"))
    evaluation = [r for r in mlflow_runs(root, method) if "test_n16_ged" in r.data.metrics]
    assert len(evaluation) == 1
    assert {"test_n4_ged", "test_n4_ci", "test_n16_dmax"} <= set(evaluation[0].data.metrics)


def test_inference_writes_samples_mean_and_variance_nifti(trained, small_demo_dataset):
    method, root, _ = trained
    _run(method, "inferring", ["inference.json"], small_demo_dataset, root)
    out = root / "runs" / method / "inference"
    assert len(list(out.glob("*.nii.gz"))) == 4 * 3  # 4 test cases x (samples, mean, variance)
    samples, _ = load_channel_first_nifti(out / "demo_tes_0000_samples.nii.gz")
    mean, _ = load_channel_first_nifti(out / "demo_tes_0000_mean.nii.gz")
    variance, _ = load_channel_first_nifti(out / "demo_tes_0000_variance.nii.gz")
    assert samples.shape == (16, 16, 16) and set(np.unique(samples)) <= {0, 1}
    np.testing.assert_allclose(mean[0], samples.mean(0), atol=1e-6)
    np.testing.assert_allclose(variance[0], mean[0] * (1 - mean[0]), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_without_checkpoint_names_the_missing_file(method, small_demo_dataset, tmp_path):
    with pytest.raises(Exception) as info:
        _run(method, "evaluating", ["evaluate.json"], small_demo_dataset, tmp_path)
    chain = []
    error: BaseException | None = info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any("model.pt" in text and "does not exist" in text for text in chain)


@pytest.mark.parametrize("method", METHODS)
def test_ms_overlay_on_a_single_channel_dataset_fails_clearly(method, small_demo_dataset):
    parser = bundle_parser(latent_bundle_configs(method), "ms.json")
    parser.update({"dataset_dir": small_demo_dataset, "demo_dir": None})
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("dataset_path")
    message = str(info.value.__cause__ or info.value)
    assert "datalist.json" in message and "image_channels=1" in message and "image_channels=4" in message
