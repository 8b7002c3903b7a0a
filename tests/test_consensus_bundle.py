"""The consensus_diffusion bundle: configs resolve, train / resume / evaluate / infer run on demo data."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import mlflow
import pytest
import torch
from _bundle_runner import SMALL_SETTINGS, bundle_parser, bundle_settings
from monai.bundle import run

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "consensus_diffusion" / "configs"
TRAIN = str(CONFIGS / "train.json")
QUBIQ = {
    "qubiq_kidney.json": (1, 3),
    "qubiq_brain_growth.json": (1, 7),
    "qubiq_brain_tumor.json": (4, 3),
    "qubiq_prostate1.json": (1, 6),
    "qubiq_prostate2.json": (1, 6),
}
TINY = SMALL_SETTINGS["consensus_diffusion"]


_parser = partial(bundle_parser, CONFIGS)  # _parser(*overlays): train.json with the overlays on top
_settings = partial(bundle_settings, TINY)  # _settings(tmp_path, dataset, **extra): run overrides


def test_every_config_file_is_valid_json_with_the_expected_entry_points():
    names = sorted(p.name for p in CONFIGS.glob("*.json"))
    assert names == sorted(
        [
            "train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "metadata.json",
            "annotator.json", "no_annotator.json", "soft_label.json", "paper_schedule.json", *QUBIQ,
        ]
    )  # fmt: skip
    for name in names:
        json.loads((CONFIGS / name).read_text())
    assert _parser("evaluate.json")["run"] == "@evaluating"
    assert _parser("inference.json")["run"] == "@inferring"
    assert (CONFIGS / "logging.conf").is_file() and (CONFIGS.parent / "LICENSE").is_file()
    assert (CONFIGS.parent / "docs" / "README.md").is_file()


def test_schedules_default_to_the_official_code_and_the_paper_overlay():
    official = _parser()
    assert (official["num_train_timesteps"], official["beta_start"], official["beta_end"]) == (100, 0.001, 0.2)
    assert official["noise_scheduler"]["variance_type"] == "learned_range"
    paper = _parser("paper_schedule.json")
    assert (paper["beta_start"], paper["beta_end"]) == (0.0001, 0.02)
    # the official value is improved-diffusion's linear schedule rescaled by 1000 / T
    assert official["beta_start"] == pytest.approx(1e-4 * 1000 / 100)
    assert official["beta_end"] == pytest.approx(0.02 * 1000 / 100)


@pytest.mark.parametrize("overlay", sorted(QUBIQ))
def test_qubiq_overlays_hold_the_paper_sizes(overlay):
    channels, _ = QUBIQ[overlay]
    parser = _parser("evaluate.json", overlay)
    assert parser["image_channels"] == channels and parser["image_size"] == [256, 256]
    widths = parser["unet_channels"]
    assert widths == [128, 128, 128, 256, 256, 512, 512]  # depth 7: [L, L, L, 2L, 2L, 4L, 4L], L = 128
    resolutions = [256 // 2**level for level, on in enumerate(parser["unet_attention_levels"]) if on]
    assert resolutions == [16, 8]
    assert parser["rrdb_blocks"] == 8 and parser["batch_size"] == 4
    assert parser["eval_generations"] == 25 and parser["eval_inference_steps"] == 100
    assert parser["eval_split"] == "validation"  # QUBIQ has no test split
    transforms = parser["train#preprocessing#transforms"]
    assert transforms.index("@augment_affine") < transforms.index("@label_strategy")
    assert parser.get_parsed_content("augment_affine#translate_range") == pytest.approx([25.6, 25.6])
    resize = parser.get_parsed_content("resize")
    assert tuple(resize.resizer.spatial_size) == (256, 256)


def test_variant_overlays_switch_the_label_strategy_and_conditioning():
    expected = {
        "annotator.json": ("SelectRaterd", "@num_raters", True, True, "binary"),
        "no_annotator.json": ("SelectRandomRaterd", None, False, True, "binary"),
        "soft_label.json": ("MeanRatersd", None, False, False, "continuous"),
    }
    for overlay, (strategy, levels, conditioned, vote, values) in expected.items():
        parser = _parser(overlay)
        assert parser["label_strategy"]["_target_"].endswith(strategy)
        assert parser["num_levels"] == levels and parser["conditioned"] is conditioned
        assert parser["majority_vote"] is vote and parser["sample_values"] == values
        assert parser["class_label_key"] == ("class_label" if conditioned else None)


def _mlflow_runs(tmp_path: Path) -> tuple[mlflow.MlflowClient, list]:
    # a client, not mlflow.set_tracking_uri: that would redirect every later MLFlowHandler of the session
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("consensus_diffusion")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def test_train_resume_evaluate_and_infer_on_demo_data(small_demo_dataset, tmp_path):
    settings = _settings(tmp_path, small_demo_dataset)
    run("training", config_file=TRAIN, max_epochs=1, val_interval=1, **settings)
    models = tmp_path / "run" / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=1.pt").is_file()
    # resume: the second call continues from the epoch-1 checkpoint (checked below in MLflow)
    run("training", config_file=TRAIN, max_epochs=2, val_interval=1, **settings)
    state = torch.load(models / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)["trainer"]
    assert (state["iteration"], state["epoch_length"]) == (4, 2)  # 2 epochs of 8 training images, batch 4

    run(
        "evaluating",
        config_file=[TRAIN, str(CONFIGS / "evaluate.json")],
        eval_generations=3,
        eval_inference_steps=3,
        **settings,
    )
    eval_dir = tmp_path / "run" / "eval"
    curve = list(csv.reader((eval_dir / "generation_curve.csv").open()))
    assert curve[0] == ["generations", "soft_dice", "soft_dice_5"] and [r[0] for r in curve[1:]] == ["1", "2", "3"]
    assert all(0.0 <= float(v) <= 1.0 for row in curve[1:] for v in row[1:])
    assert (eval_dir / "generation_curve.png").stat().st_size > 0
    # the evaluation's figures are named (and titled) by the phase, not by the evaluator's epoch 1 (issue #18)
    assert (eval_dir / "levels.png").is_file() and (eval_dir / "mode_frequencies.png").is_file()
    assert not list(eval_dir.glob("*_epoch*.png"))
    per_image = list(csv.DictReader((eval_dir / "n4_per_image.csv").open()))  # N = the 4 per-level masks
    assert len(per_image) == 4 and {"soft_dice", "soft_dice_5", "ged", "ci"} <= set(per_image[0])
    # the evaluation's soft Dice with G = 3 is the last point of the curve
    mean_soft_dice = sum(float(r["soft_dice"]) for r in per_image) / len(per_image)
    assert mean_soft_dice == pytest.approx(float(curve[-1][1]), abs=1e-5)

    client, runs = _mlflow_runs(tmp_path)
    names = [r.info.run_name.rsplit("_", 2)[0] for r in runs]  # strip the time stamps
    # the resumed training continues its MLflow run (issue #18): one training run, then the evaluation's
    assert names == ["consensus_diffusion_consensus", "consensus_diffusion_consensus_eval"]
    training, evaluation = runs
    assert [m.step for m in client.get_metric_history(training.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(training.info.run_id, "soft_dice")] == [1, 2]
    assert {"soft_dice", "soft_dice_5", "ged", "ci"} <= set(training.data.metrics)
    assert {"test_n4_soft_dice", "test_n4_soft_dice_5", "test_n4_ged", "soft_dice_vs_generations"} <= set(evaluation.data.metrics)
    curve_history = client.get_metric_history(evaluation.info.run_id, "soft_dice_vs_generations")
    assert [m.step for m in curve_history] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "generation_curve")}
    assert artifacts == {"generation_curve/generation_curve.png", "generation_curve/generation_curve.csv"}

    run(
        "inferring",
        config_file=[TRAIN, str(CONFIGS / "inference.json")],
        inference_generations=2,
        inference_steps=3,
        **settings,
    )
    written = sorted(p.name for p in (tmp_path / "run" / "inference").iterdir())
    assert len(written) == 4 * 3 and all(name.endswith(".nii.gz") for name in written)


@pytest.mark.parametrize("overlay", ["annotator.json", "no_annotator.json", "soft_label.json"])
def test_ablation_variants_train_one_epoch(overlay, small_demo_dataset, tmp_path):
    settings = _settings(tmp_path, small_demo_dataset)
    run("training", config_file=[TRAIN, str(CONFIGS / overlay)], max_epochs=1, val_interval=1, **settings)
    assert (tmp_path / "run" / "models" / "model.pt").is_file()
