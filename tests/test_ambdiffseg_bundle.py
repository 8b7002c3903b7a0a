"""The ambdiffseg bundle: configs resolve to the paper's settings; train / resume / evaluate / infer on demo data."""

from __future__ import annotations

import csv
import json
import shutil
from functools import partial
from pathlib import Path

import mlflow
import pytest
import torch
from _bundle_runner import SMALL_SETTINGS, bundle_parser, bundle_settings
from monai.bundle import run

from ambiseg_monai.bundle.config import merged_config

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "ambdiffseg" / "configs"
TRAIN = str(CONFIGS / "train.json")
ABLATIONS = {
    "ablation_prediction_v.json": ("v", "truncated_snr"),
    "ablation_prediction_eps.json": ("eps", "truncated_snr"),
    "ablation_weighting_snr.json": ("x", "snr"),
    "ablation_weighting_snr_plus_one.json": ("x", "snr_plus_one"),
    "ablation_weighting_uniform.json": ("x", "uniform"),
    "ablation_weighting_sigmoid.json": ("x", "sigmoid"),
}
TINY = SMALL_SETTINGS["ambdiffseg"]


_parser = partial(bundle_parser, CONFIGS)  # _parser(*overlays): train.json with the overlays on top
_settings = partial(bundle_settings, TINY)  # _settings(tmp_path, dataset, **extra): run overrides


def test_every_config_file_is_valid_json_with_the_expected_entry_points():
    names = sorted(p.name for p in CONFIGS.glob("*.json"))
    expected = ["train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "metadata.json"]
    assert names == sorted([*expected, "lidc.json", "lidc_crop64.json", "flow_matching.json", *ABLATIONS])
    for name in names:
        json.loads((CONFIGS / name).read_text())
    assert _parser("evaluate.json")["run"] == "@evaluating"
    assert _parser("inference.json")["run"] == "@inferring"
    # the multi-GPU overlay pulls its pieces from bundles/common (MONAI resolves the % macros when parsing)
    multi_gpu = merged_config([TRAIN, str(CONFIGS / "multi_gpu_train.json")], root=CONFIGS.parents[2])
    assert multi_gpu["network"]["_target_"].endswith("DistributedDataParallel")
    assert (CONFIGS / "logging.conf").is_file() and (CONFIGS.parent / "LICENSE").is_file()
    assert (CONFIGS.parent / "docs" / "README.md").is_file()


def test_lidc_overlay_holds_the_paper_settings():
    parser = _parser("lidc.json")
    assert parser["center_crop_size"] == [128, 128] and parser["random_crop_size"] == [-1, -1]
    assert (parser["input_scale"], parser["prediction_type"], parser["loss_weighting"]) == (0.1, "x", "truncated_snr")
    assert parser["tanh_x_output"] is True and parser["num_inference_steps"] == 10
    assert parser["sampling_scheduler"]["_target_"].endswith("ContinuousDDIMScheduler")
    assert (parser["learning_rate"], parser["weight_decay"], parser["batch_size"], parser["grad_clip_norm"]) == (
        1e-4, 0.01, 8, 1.0,
    )  # fmt: skip
    assert (parser["lr_warmup_steps"], parser["lr_decay_steps"]) == (1000, 100000)
    assert parser.get_parsed_content("total_steps") == 400000
    assert parser["unet_channels"] == [32, 32, 64, 128] and parser["unet_res_blocks"] == [1, 2, 3, 4]
    assert parser["unet_attention_levels"] == [False, False, False, True]
    network = parser.get_parsed_content("network_def")
    # 6.9 M in the paper; MONAI's U-Net has one middle block where the paper has 4 res blocks
    assert 6.0e6 < sum(p.numel() for p in network.parameters()) < 7.0e6
    schedule = parser.get_parsed_content("schedule")
    assert (schedule.logsnr_min, schedule.logsnr_max) == (-20.0, 20.0)


def test_lr_schedule_spans_the_run_with_and_without_iterations_per_epoch(small_demo_dataset):
    """The warm-up and the cosine decay are fractions of the run's iterations: an ``iterations_per_epoch``
    epoch (a shorter or longer epoch than one pass over the data) must count as such, or the schedule ends early
    and the rest of the run trains at learning rate 0."""
    for per_epoch, expected in ((None, 3 * 2), (7, 3 * 7)):  # 8 training images, batch 4: 2 batches per epoch
        parser = _parser()
        parser.update({"dataset_dir": small_demo_dataset, "demo_dir": None, "batch_size": 4, "max_epochs": 3,
                       "iterations_per_epoch": per_epoch})  # fmt: skip
        schedule = parser.get_parsed_content("lr_schedule")
        assert schedule.total_steps == expected
        assert (schedule.warmup_steps, schedule.decay_steps) == (expected // 10, expected // 4)


def test_crop64_overlay_uses_random_crops_and_ddpm():
    parser = _parser("lidc.json", "lidc_crop64.json")
    assert parser["center_crop_size"] == [128, 128] and parser["random_crop_size"] == [64, 64]
    sampler = parser["sampling_scheduler"]
    assert sampler["_target_"].endswith("ContinuousDDPMScheduler")
    assert parser.get_parsed_content("experiment_name") == "ambdiffseg_lidc_crop64"


@pytest.mark.parametrize("overlay", sorted(ABLATIONS))
def test_ablation_overlays_change_one_component(overlay):
    prediction, weighting = ABLATIONS[overlay]
    parser = _parser("lidc.json", overlay)
    assert parser.get_parsed_content("parameterization").prediction_type == prediction
    weights = parser.get_parsed_content("loss_weights")
    assert weights.weighting == weighting
    if weighting == "sigmoid":
        assert weights.sigmoid_bias == -6.0 and weights.times_neg_dlogsnr_dt
    assert parser.get_parsed_content("experiment_name") == "ambdiffseg_lidc"
    tag = overlay[len("ablation_") : -len(".json")]
    assert parser.get_parsed_content("output_dir") == f"runs/ambdiffseg_lidc_{tag}"
    # everything else stays the paper's
    assert parser["input_scale"] == 0.1 and parser["unet_channels"] == [32, 32, 64, 128]


def _mlflow_runs(tmp_path: Path):
    # a client, not mlflow.set_tracking_uri: that would redirect every later MLFlowHandler of the session
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    return client.search_runs([client.get_experiment_by_name("ambdiffseg").experiment_id])


@pytest.fixture(scope="module")
def trained_run(small_demo_dataset, tmp_path_factory) -> Path:
    """One epoch of demo training (tiny network); tests copy the run folder before changing it."""
    root = tmp_path_factory.mktemp("ambdiffseg")
    run("training", config_file=TRAIN, max_epochs=1, val_interval=1, **_settings(root, small_demo_dataset))
    return root


def _copy_run(trained_run: Path, tmp_path: Path) -> None:
    shutil.copytree(trained_run / "run", tmp_path / "run")
    shutil.copy(trained_run / "mlruns.db", tmp_path / "mlruns.db")


def test_train_resume_evaluate_and_infer_on_demo_data(trained_run, small_demo_dataset, tmp_path):
    _copy_run(trained_run, tmp_path)
    settings = _settings(tmp_path, small_demo_dataset)
    models = tmp_path / "run" / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=1.pt").is_file()
    # resume: the second call continues at epoch 1 (the LR schedule steps once per iteration: 2 per epoch)
    run("training", config_file=TRAIN, max_epochs=2, val_interval=1, **settings)
    checkpoint = torch.load(models / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 4 and checkpoint["lr_scheduler"]["last_epoch"] == 4

    run("evaluating", config_file=[TRAIN, str(CONFIGS / "evaluate.json")], **settings)
    eval_dir = tmp_path / "run" / "eval"
    for n in (4, 16):
        rows = list(csv.DictReader((eval_dir / f"n{n}_per_image.csv").open()))
        columns = {"ged", "ged_pp", "ci", "ci_pp", "dmax", "cross_pair_dice_pp"}
        assert len(rows) == 4 and columns <= set(rows[0])
        assert all(0.0 <= float(r["ged"]) <= 2.0 and 0.0 <= float(r["ged_pp"]) <= 2.0 for r in rows)
        assert (eval_dir / f"n{n}_summary.json").is_file()

    runs = _mlflow_runs(tmp_path)
    training = [r for r in runs if "_eval" not in r.info.run_name]
    logged = {"l_simple", "ged", "ged_pp", "ci", "ci_pp", "dmax"}
    assert training and all(logged <= set(r.data.metrics) for r in training)
    assert training[0].data.params["prediction_type"] == "x"
    assert training[0].data.params["loss_weighting"] == "truncated_snr"
    evaluation = next(r for r in runs if "_eval" in r.info.run_name)
    assert {"test_n4_ged", "test_n4_ged_pp", "test_n16_ged", "test_n16_ci"} <= set(evaluation.data.metrics)

    run("inferring", config_file=[TRAIN, str(CONFIGS / "inference.json")], num_inference_samples=2, **settings)
    written = sorted(p.name for p in (tmp_path / "run" / "inference").iterdir())
    assert len(written) == 4 * 3 and all(name.endswith(".nii.gz") for name in written)


def test_random_crop_evaluation_is_repeatable(trained_run, small_demo_dataset, tmp_path):
    _copy_run(trained_run, tmp_path)
    settings = _settings(tmp_path, small_demo_dataset, random_crop_size=[8, 8])
    only_n4 = ["$monai.utils.set_determinism(seed=@seed)", "$@evaluate#n4#evaluator.run()"]
    tables = []
    for seed in (0, 0, 1):
        eval_dir = tmp_path / f"eval{len(tables)}"
        config = [TRAIN, str(CONFIGS / "evaluate.json")]
        run("evaluating", config_file=config, eval_dir=str(eval_dir), evaluating=only_n4, seed=seed, **settings)
        tables.append((eval_dir / "n4_per_image.csv").read_text())
    assert tables[0] == tables[1]  # same seed: same crops and samples
    assert tables[0] != tables[2]
