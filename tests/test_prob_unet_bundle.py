"""End-to-end tests of bundles/prob_unet: train -> resume -> evaluate -> inference on a tiny demo dataset,
the latent-family variant overlays and the dataset overlays.

Every run is tiny (16 x 16 images, 8 training cases, a 2-level network, 1-2 epochs) and logs to a temporary
SQLite MLflow store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _bundle_runner import link_bundles, mlflow_runs, run_bundle, run_bundle_here
from monai.bundle import ConfigParser, ConfigWorkflow

from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.engines.latent_models import ProbUNetELBOLoss
from ambiseg_monai.networks import latent_distributions as families
from ambiseg_monai.networks.prob_unet import ProbabilisticUNet

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "prob_unet" / "configs"
TRAIN = str(CONFIGS / "train.json")
METRICS_LOGGED = ("ged", "ci", "max_dice_matching", "combined_sensitivity", "diversity_agreement", "sample_diversity")


def _overrides(dataset_dir: str, root: Path, **extra) -> dict:
    """Small network, 1 epoch with validation; the bundle's own relative output paths are kept.

    The MLflow store gets an absolute URI: MLflow caches one store per URI string, so the bundle's relative
    ``sqlite:///mlruns.db`` would keep writing to the first test's folder after a change of directory.
    """
    return {
        "dataset_dir": dataset_dir,
        "demo_dir": None,
        "tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
        "unet_channels": [8, 16],
        "num_res_units": 1,
        "batch_size": 4,
        "max_epochs": 1,
        "val_interval": 1,
        **extra,
    }


def _run(config_files: list[str], run_id: str, overrides: dict, cwd: Path) -> ConfigWorkflow:
    return run_bundle(CONFIGS, config_files, run_id, overrides, cwd)


def _run_here(config_files: list[str], run_id: str, overrides: dict) -> ConfigWorkflow:
    return run_bundle_here(CONFIGS, config_files, run_id, overrides)


def _runs(root: Path, experiment: str = "prob_unet") -> list:
    return mlflow_runs(root, experiment)


@pytest.fixture(scope="module")
def trained(small_demo_dataset, tmp_path_factory):
    """One tiny training run (1 epoch, validated); returns (root folder, workflow)."""
    root = tmp_path_factory.mktemp("prob_unet")
    workflow = _run([TRAIN], "training", _overrides(small_demo_dataset, root), root)
    return root, workflow


def test_training_writes_checkpoints_sample_grid_and_mlflow_metrics(trained):
    root, workflow = trained
    models = root / "runs" / "prob_unet" / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file()
    assert (models / "model.pt").is_file()
    best = ProbabilisticUNet(channels=(8, 16), num_res_units=1)
    best.load_state_dict(torch.load(models / "model.pt", weights_only=True))  # the best-GED network's weights
    assert list((root / "runs" / "prob_unet" / "samples").glob("*.png"))

    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2  # 8 cases / batch 4
    loss = workflow.parser.get_parsed_content("train#loss")
    assert set(loss.last_terms) == {"loss", "reconstruction", "kl", "l2"}
    assert loss.last_terms["kl"] >= 0 and loss.last_terms["reconstruction"] > 0

    (run,) = [r for r in _runs(root) if not any(key.startswith("test_") for key in r.data.metrics)]
    metrics = run.data.metrics
    for name in METRICS_LOGGED:
        assert name in metrics and np.isfinite(metrics[name]), name
    assert 0.0 <= metrics["ged"] <= 2.0
    assert 0.0 <= metrics["ci"] <= 1.0
    for term in ("loss", "reconstruction", "kl", "l2"):  # training loss terms, every iteration
        assert term in metrics, term
    assert run.data.params["method"] == "prob_unet"
    assert run.data.params["latent_distribution"].endswith("AxisAlignedGaussian")


def test_training_resumes_from_the_last_epoch_checkpoint(small_demo_dataset, tmp_path):
    overrides = _overrides(small_demo_dataset, tmp_path, val_interval=10)
    _run([TRAIN], "training", overrides, tmp_path)
    first = torch.load(tmp_path / "runs/prob_unet/models/checkpoint_epoch=1.pt", weights_only=False)
    workflow = _run([TRAIN], "training", {**overrides, "max_epochs": 2}, tmp_path)
    checkpointer = workflow.parser.get_parsed_content("train#handlers")[0]
    assert checkpointer.loaded_from is not None and checkpointer.loaded_from.name == "checkpoint_epoch=1.pt"
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 4)  # continued, not restarted
    models = tmp_path / "runs/prob_unet/models"
    assert (models / "checkpoint_epoch=2.pt").is_file()
    second = torch.load(models / "checkpoint_epoch=2.pt", weights_only=False)
    assert second["trainer"]["iteration"] == 4 and first["trainer"]["iteration"] == 2


def test_evaluate_writes_per_image_tables_for_4_and_16_samples(trained, small_demo_dataset):
    root, _ = trained
    _run([TRAIN, str(CONFIGS / "evaluate.json")], "evaluating", _overrides(small_demo_dataset, root), root)
    eval_dir = root / "runs" / "prob_unet" / "eval"
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
    evaluation = [r for r in _runs(root) if "test_n16_ged" in r.data.metrics]
    assert len(evaluation) == 1
    assert {"test_n4_ged", "test_n4_ci", "test_n16_max_dice_matching"} <= set(evaluation[0].data.metrics)


def test_inference_writes_samples_mean_and_variance_nifti(trained, small_demo_dataset):
    root, _ = trained
    _run([TRAIN, str(CONFIGS / "inference.json")], "inferring", _overrides(small_demo_dataset, root), root)
    out = root / "runs" / "prob_unet" / "inference"
    assert len(list(out.glob("*.nii.gz"))) == 4 * 3  # 4 test cases x (samples, mean, variance)
    samples, _ = load_channel_first_nifti(out / "demo_tes_0000_samples.nii.gz")
    mean, _ = load_channel_first_nifti(out / "demo_tes_0000_mean.nii.gz")
    variance, _ = load_channel_first_nifti(out / "demo_tes_0000_variance.nii.gz")
    assert samples.shape == (16, 16, 16) and set(np.unique(samples)) <= {0, 1}
    np.testing.assert_allclose(mean[0], samples.mean(0), atol=1e-6)
    np.testing.assert_allclose(variance[0], mean[0] * (1 - mean[0]), atol=1e-6)


def test_evaluate_without_checkpoint_names_the_missing_file(small_demo_dataset, tmp_path):
    with pytest.raises(Exception) as info:
        _run([TRAIN, str(CONFIGS / "evaluate.json")], "evaluating", _overrides(small_demo_dataset, tmp_path), tmp_path)
    chain = []
    error: BaseException | None = info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any("model.pt" in text and "does not exist" in text for text in chain)


@pytest.mark.parametrize(
    "variant, family",
    [
        ("mixture_axis_aligned", families.MixtureOfAxisAlignedGaussians),
        ("full_covariance", families.FullCovarianceGaussian),
        ("mixture_full_covariance", families.MixtureOfFullCovarianceGaussians),
    ],
)
def test_variant_overlay_swaps_the_latent_family_and_trains_one_step(
    small_demo_dataset, tmp_path, monkeypatch, variant, family
):
    monkeypatch.chdir(tmp_path)  # the bundle writes runs/ and mlruns.db relative to the working directory
    link_bundles(tmp_path)  # and reads bundles/common relative to it
    parser = ConfigParser()
    parser.read_config([TRAIN, str(CONFIGS / f"{variant}.json")])
    parser.update(_overrides(small_demo_dataset, tmp_path, **{"iterations_per_epoch": 1, "val_interval": 100}))
    network = parser.get_parsed_content("network")
    assert type(network.latent_distribution) is family
    assert network.latent_distribution.latent_dim == 6
    before = [p.detach().clone() for p in network.parameters()]
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    assert trainer.state.iteration == 1
    assert np.isfinite(parser.get_parsed_content("train#loss").last_terms["loss"])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, network.parameters()))
    # a variant keeps its own checkpoints (resuming across latent families would fail) and its own run name
    assert (tmp_path / "runs" / f"prob_unet_{variant}" / "models" / "checkpoint_epoch=1.pt").is_file()
    (run,) = _runs(tmp_path)
    assert run.info.run_name.startswith(f"prob_unet_{variant}_")
    assert run.data.params["latent_distribution"].endswith(family.__name__)


@pytest.mark.parametrize("overlay, channels", [("lidc", 1), ("ms", 4), ("bone_us", 1)])
def test_dataset_overlays_hold_the_paper_settings(overlay, channels):
    parser = ConfigParser()
    parser.read_config([TRAIN, str(CONFIGS / f"{overlay}.json")])
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, ProbabilisticUNet)
    assert network.channels == (32, 64, 128, 192) and network.in_channels == channels
    assert type(network.latent_distribution) is families.AxisAlignedGaussian
    assert network.latent_distribution.latent_dim == 6
    loss = parser.get_parsed_content("train#loss")
    assert isinstance(loss, ProbUNetELBOLoss) and (loss.beta, loss.l2_weight) == (10.0, 1e-5)
    assert parser.get_parsed_content("dataset_dir") == f"data/{overlay}"
    assert parser.get_parsed_content("output_dir") == f"runs/prob_unet_{overlay}"


def test_ms_overlay_on_a_single_channel_dataset_fails_clearly(small_demo_dataset):
    parser = ConfigParser()
    parser.read_config([TRAIN, str(CONFIGS / "ms.json")])
    parser.update({"dataset_dir": small_demo_dataset, "demo_dir": None})
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("dataset_path")
    message = str(info.value.__cause__ or info.value)
    assert "datalist.json" in message and "image_channels=1" in message and "image_channels=4" in message
