"""End-to-end tests of bundles/phiseg: train -> resume -> evaluate -> inference on a tiny demo dataset, and
the dataset overlays (the paper's 7 resolution / 5 latent levels).

Every run is tiny (16 x 16 images, 8 training cases, a 3-level network with 2 latent levels, 1-2 epochs) and
logs to a temporary SQLite MLflow store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _bundle_runner import mlflow_runs, run_bundle, run_bundle_here
from monai.bundle import ConfigParser, ConfigWorkflow

from ambiseg_monai.data.nifti import load_channel_first_nifti
from ambiseg_monai.engines.latent_models import PHiSegELBOLoss
from ambiseg_monai.networks.phiseg import PHiSeg

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "phiseg" / "configs"
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
        "channels": [8, 16, 16],
        "latent_levels": 2,
        "convs_per_level": 1,
        "batch_size": 4,
        "max_epochs": 1,
        "val_interval": 1,
        **extra,
    }


def _run(config_files: list[str], run_id: str, overrides: dict, cwd: Path) -> ConfigWorkflow:
    return run_bundle(CONFIGS, config_files, run_id, overrides, cwd)


def _run_here(config_files: list[str], run_id: str, overrides: dict) -> ConfigWorkflow:
    return run_bundle_here(CONFIGS, config_files, run_id, overrides)


def _runs(root: Path, experiment: str = "phiseg") -> list:
    return mlflow_runs(root, experiment)


@pytest.fixture(scope="module")
def trained(small_demo_dataset, tmp_path_factory):
    """One tiny training run (1 epoch, validated); returns (root folder, workflow)."""
    root = tmp_path_factory.mktemp("phiseg")
    workflow = _run([TRAIN], "training", _overrides(small_demo_dataset, root), root)
    return root, workflow


def test_training_writes_checkpoints_sample_grid_and_mlflow_metrics(trained):
    root, workflow = trained
    models = root / "runs" / "phiseg" / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file()
    assert (models / "model.pt").is_file()
    best = PHiSeg(channels=(8, 16, 16), latent_levels=2, convs_per_level=1)
    best.load_state_dict(torch.load(models / "model.pt", weights_only=True))  # the best-GED network's weights
    assert list((root / "runs" / "phiseg" / "samples").glob("*.png"))

    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2  # 8 cases / batch 4
    loss = workflow.parser.get_parsed_content("train#loss")
    levels = {f"{term}_level{l}" for term in ("kl", "reconstruction") for l in range(2)}
    assert set(loss.last_terms) == {"loss", "reconstruction", "kl", "l2"} | levels
    terms = loss.last_terms
    assert terms["kl"] == pytest.approx(terms["kl_level0"] + 4 * terms["kl_level1"], rel=1e-5)  # KL weight 4^l
    level_sum = terms["reconstruction_level0"] + terms["reconstruction_level1"]
    assert terms["reconstruction"] == pytest.approx(level_sum, rel=1e-5)  # every level reconstructs the mask

    (run,) = [r for r in _runs(root) if not any(key.startswith("test_") for key in r.data.metrics)]
    metrics = run.data.metrics
    for name in METRICS_LOGGED:
        assert name in metrics and np.isfinite(metrics[name]), name
    assert 0.0 <= metrics["ged"] <= 2.0
    assert 0.0 <= metrics["ci"] <= 1.0
    for term in ("loss", "reconstruction", "kl", "kl_level0", "kl_level1", "reconstruction_level1"):
        assert term in metrics, term  # training loss terms, every iteration
    assert run.data.params["method"] == "phiseg"
    assert run.data.params["latent_levels"] == "2"


def test_training_resumes_from_the_last_epoch_checkpoint(small_demo_dataset, tmp_path):
    overrides = _overrides(small_demo_dataset, tmp_path, val_interval=10)
    _run([TRAIN], "training", overrides, tmp_path)
    first = torch.load(tmp_path / "runs/phiseg/models/checkpoint_epoch=1.pt", weights_only=False)
    workflow = _run([TRAIN], "training", {**overrides, "max_epochs": 2}, tmp_path)
    checkpointer = workflow.parser.get_parsed_content("train#handlers")[0]
    assert checkpointer.loaded_from is not None and checkpointer.loaded_from.name == "checkpoint_epoch=1.pt"
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 4)  # continued, not restarted
    models = tmp_path / "runs/phiseg/models"
    assert (models / "checkpoint_epoch=2.pt").is_file()
    second = torch.load(models / "checkpoint_epoch=2.pt", weights_only=False)
    assert second["trainer"]["iteration"] == 4 and first["trainer"]["iteration"] == 2


def test_evaluate_writes_per_image_tables_for_4_and_16_samples(trained, small_demo_dataset):
    root, _ = trained
    _run([TRAIN, str(CONFIGS / "evaluate.json")], "evaluating", _overrides(small_demo_dataset, root), root)
    eval_dir = root / "runs" / "phiseg" / "eval"
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
    out = root / "runs" / "phiseg" / "inference"
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


@pytest.mark.parametrize("overlay, channels", [("lidc", 1), ("ms", 4), ("bone_us", 1)])
def test_dataset_overlays_hold_the_paper_settings(overlay, channels):
    parser = ConfigParser()
    parser.read_config([TRAIN, str(CONFIGS / f"{overlay}.json")])
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, PHiSeg)
    assert network.channels == (32, 64, 128, 192, 192, 192, 192) and network.latent_levels == 5
    assert network.in_channels == channels and network.size_divisor == 64
    loss = parser.get_parsed_content("train#loss")
    assert isinstance(loss, PHiSegELBOLoss) and loss.exponential_kl_weighting and loss.reconstruction_weight == 1.0
    assert loss.level_kl_weights(5).tolist() == [1.0, 4.0, 16.0, 64.0, 256.0]
    assert parser.get_parsed_content("learning_rate") == 1e-3 and parser.get_parsed_content("batch_size") == 12
    assert parser.get_parsed_content("dataset_dir") == f"data/{overlay}"
    assert parser.get_parsed_content("output_dir") == f"runs/phiseg_{overlay}"


def test_lidc_network_trains_on_a_128_pixel_batch():
    """The paper's 7 / 5 level network on LIDC-sized input: shapes of the training dict and of the samples."""
    parser = ConfigParser()
    parser.read_config([TRAIN, str(CONFIGS / "lidc.json")])
    network = parser.get_parsed_content("network_def")
    image, target = torch.randn(2, 1, 128, 128), (torch.rand(2, 1, 128, 128) > 0.5).float()
    out = network(image, target)
    assert out["logits"].shape == (2, 1, 128, 128) and out["level_logits"].shape == (2, 5, 128, 128)
    assert out["kl"].shape == (2, 5) and bool((out["kl"] >= 0).all())
    network.eval()
    with torch.no_grad():
        assert network.sample(image[:1], 3).shape == (1, 3, 128, 128)


def test_ms_overlay_on_a_single_channel_dataset_fails_clearly(small_demo_dataset):
    parser = ConfigParser()
    parser.read_config([TRAIN, str(CONFIGS / "ms.json")])
    parser.update({"dataset_dir": small_demo_dataset, "demo_dir": None})
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("dataset_path")
    message = str(info.value.__cause__ or info.value)
    assert "datalist.json" in message and "image_channels=1" in message and "image_channels=4" in message
