"""The CIMD bundle end to end on a tiny demo dataset: train, resume, evaluate, infer, clear errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _bundle_runner import SMALL_SETTINGS
from monai.bundle import ConfigWorkflow

from ambiseg_monai.data.nifti import load_channel_first_nifti, save_channel_first_nifti
from ambiseg_monai.handlers import latest_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cimd" / "configs"
TINY = {**SMALL_SETTINGS["cimd"], "inference_steps": 2, "num_inference_samples": 3, "amp": False}


def _run(files: list[str], run_id: str, **overrides):
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files], workflow_type=None, run_id=run_id, **{**TINY, **overrides}
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def _messages(error: BaseException) -> str:
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(parts)


@pytest.fixture(scope="module")
def trained(small_demo_dataset, tmp_path_factory):
    """One epoch of training (with validation); returns the overrides pointing at its outputs."""
    root = tmp_path_factory.mktemp("cimd_bundle")
    settings = {
        "dataset_dir": small_demo_dataset,
        "output_dir": str(root / "run"),
        "tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
    }
    workflow = _run(["train.json"], "training", max_epochs=1, val_interval=1, **settings)
    return settings, workflow


def test_training_writes_checkpoints_samples_and_mlflow_run(trained):
    settings, workflow = trained
    models = Path(settings["output_dir"]) / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file() and (models / "model.pt").is_file()
    assert (Path(settings["output_dir"]) / "samples" / "samples_epoch0001.png").is_file()
    import mlflow

    client = mlflow.MlflowClient(settings["tracking_uri"])
    experiment = client.get_experiment_by_name("cimd")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert {"l_simple", "l_vlb", "l_amb", "loss", "ged", "ci", "dmax"} <= set(run.data.metrics)
    assert run.data.params["vlb_weight"] == "0.001" and run.data.params["num_train_timesteps"] == "20"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/samples_epoch0001.png"]


def test_rerun_resumes_from_the_last_checkpoint(trained):
    settings, first = trained
    epoch_length = first.parser.get_parsed_content("train#trainer").state.epoch_length
    second = _run(["train.json"], "training", max_epochs=2, val_interval=5, **settings)
    state = second.parser.get_parsed_content("train#trainer").state
    assert state.epoch == 2 and state.iteration == 2 * epoch_length  # one more epoch, not two
    models = Path(settings["output_dir"]) / "models"
    assert latest_checkpoint(models) == models / "checkpoint_epoch=2.pt"


def test_evaluate_writes_per_image_tables_for_4_and_16_samples(trained, small_demo_dataset):
    settings, _ = trained
    _run(["train.json", "evaluate.json"], "evaluating", **settings)
    eval_dir = Path(settings["output_dir"]) / "eval"
    test_ids = [i["case_id"] for i in json.loads((Path(small_demo_dataset) / "datalist.json").read_text())["test"]]
    for n in (4, 16):
        with open(eval_dir / f"n{n}_per_image.csv", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert [r["case_id"] for r in rows] == test_ids
        assert {"ged", "ci", "combined_sensitivity", "dmax", "diversity_agreement"} <= set(rows[0])
        summary = json.loads((eval_dir / f"n{n}_summary.json").read_text())
        mean_ged = np.mean([float(r["ged"]) for r in rows])
        assert summary["ged"]["mean"] == pytest.approx(mean_ged, abs=1e-5)
        assert summary["ged"]["num_images"] == len(test_ids)


def test_inference_writes_samples_mean_and_variance_with_input_geometry(trained, small_demo_dataset, tmp_path):
    settings, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    source = Path(small_demo_dataset) / "images"
    for f in sorted(source.iterdir())[:2]:
        array, _ = load_channel_first_nifti(f)
        affine = np.diag([0.7, 0.7, 2.0, 1.0])  # a non-trivial geometry must be kept
        save_channel_first_nifti(images / f.name, array, affine)
    out = tmp_path / "out"
    _run(["train.json", "inference.json"], "inferring", input_dir=str(images), inference_dir=str(out), **settings)
    for f in sorted(images.iterdir()):
        case = f.name.split(".nii")[0]
        samples = nib.load(out / f"{case}_samples.nii.gz")
        assert samples.shape == (16, 16, 1, 3) and samples.get_data_dtype() == np.uint8
        assert np.allclose(samples.affine, nib.load(f).affine)
        masks = np.asanyarray(samples.dataobj)
        mean = np.asanyarray(nib.load(out / f"{case}_mean.nii.gz").dataobj)
        variance = np.asanyarray(nib.load(out / f"{case}_variance.nii.gz").dataobj)
        assert set(np.unique(masks)) <= {0, 1}
        assert np.allclose(mean[..., 0], masks.mean(axis=-1)) and np.allclose(variance, mean * (1 - mean))


def test_inference_in_bfloat16_from_the_command_line_override(trained, small_demo_dataset, tmp_path):
    settings, _ = trained
    outputs = {}
    for precision in ("fp32", "bf16"):
        overrides = {"infer#inferer#autocast_dtype": "bfloat16"} if precision == "bf16" else {}
        out = tmp_path / precision
        workflow = _run(["train.json", "inference.json"], "inferring", input_dir=small_demo_dataset,
                        inference_dir=str(out), **settings, **overrides)  # fmt: skip
        assert workflow.parser.get_parsed_content("infer#inferer").autocast_dtype == (
            torch.bfloat16 if precision == "bf16" else None
        )
        outputs[precision] = {f.name: np.asanyarray(nib.load(f).dataobj) for f in sorted(out.glob("*_samples.nii.gz"))}
    assert outputs["bf16"].keys() == outputs["fp32"].keys() and len(outputs["fp32"]) == 4  # the 4 test images
    for name, masks in outputs["bf16"].items():
        assert masks.shape == outputs["fp32"][name].shape and set(np.unique(masks)) <= {0, 1}


def test_missing_checkpoint_is_a_clear_error(trained):
    settings, _ = trained
    with pytest.raises(Exception) as info:
        _run(["train.json", "evaluate.json"], "evaluating", **{**settings, "ckpt_path": "/nonexistent/model.pt"})
    assert "checkpoint '/nonexistent/model.pt' does not exist" in _messages(info.value)


def test_wrong_image_channels_is_a_clear_error(trained):
    settings, _ = trained
    with pytest.raises(Exception) as info:
        _run(["train.json"], "training", max_epochs=1, image_channels=4, **settings)
    assert "the dataset has image_channels=1 but the bundle's network is configured for image_channels=4" in _messages(
        info.value
    )


def test_rater_count_mismatch_is_a_clear_error(small_demo_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_demo_dataset, broken)
    item = json.loads((broken / "datalist.json").read_text())["training"][0]
    raters, affine = load_channel_first_nifti(broken / item["label"])
    save_channel_first_nifti(broken / item["label"], raters[:3], affine)  # datalist says 4 raters
    with pytest.raises(Exception) as info:
        _run(["train.json"], "training", max_epochs=1, dataset_dir=str(broken), output_dir=str(tmp_path / "run"))
    message = _messages(info.value)
    assert f"case '{item['case_id']}'" in message and "holds 3 rater masks, expected 4" in message


def test_ablation_and_dataset_overlays_change_the_right_components():
    from monai.bundle import ConfigParser

    from ambiseg_monai.transforms.raters import MeanRatersd, SelectRandomRaterd

    def parser(*overlays):
        p = ConfigParser()
        p.read_config([str(CONFIGS / f) for f in ("train.json", *overlays)])
        p.update({"unet_channels": [8, 8], "unet_norm_groups": 4, "unet_head_channels": 8})
        return p

    base = parser()
    assert base.get_parsed_content("network_def").amn is not None
    assert isinstance(base.get_parsed_content("train#preprocessing").transforms[2], SelectRandomRaterd)
    det = parser("ddpm_det_seg.json")
    assert det.get_parsed_content("network_def").amn is None
    assert isinstance(det.get_parsed_content("train#preprocessing").transforms[2], MeanRatersd)
    prob = parser("ddpm_prob_seg.json")
    assert prob.get_parsed_content("network_def").acn is None
    assert isinstance(prob.get_parsed_content("train#preprocessing").transforms[2], SelectRandomRaterd)
    for overlay, channels, levels in (("lidc.json", 1, 5), ("ms.json", 4, 4), ("bone_us.json", 1, 6)):
        p = ConfigParser()
        p.read_config([str(CONFIGS / "train.json"), str(CONFIGS / overlay)])
        assert p["image_channels"] == channels and len(p["unet_channels"]) == levels
        assert p["learning_rate"] == 1e-4 and p["ema_decay"] == 0.9999 and p["eval_inference_steps"] == 1000
        assert p["unet_attention_levels"].count(True) == 1
