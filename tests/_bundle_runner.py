"""Run a bundle in-process (like ``python -m monai.bundle run``) and read its MLflow runs: shared by the
latent-model bundle tests."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from monai.bundle import ConfigParser, ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
# Each bundle's smallest settings for tests on the 16 x 16 demo data (networks, batch, sampling steps)
SMALL_SETTINGS = {
    # prob_unet: 2 levels; phiseg: 3 levels, 2 of them latent
    "prob_unet": {"unet_channels": [8, 16], "num_res_units": 1},
    "phiseg": {"channels": [8, 16, 16], "latent_levels": 2, "convs_per_level": 1},
    "cimd": {
        "unet_channels": [8, 8], "unet_norm_groups": 4, "unet_head_channels": 8, "num_train_timesteps": 20,
        "batch_size": 4, "num_val_samples": 2, "val_inference_steps": 2, "eval_inference_steps": 2,
        "eval_batch_size": 4,
    },
    "ambdiffseg": {
        "unet_channels": [8, 16], "unet_res_blocks": [1, 1], "unet_norm_groups": 4, "unet_head_channels": 8,
        "batch_size": 4, "num_inference_steps": 3, "amp": False,
    },
    "consensus_diffusion": {
        "unet_channels": [8, 16], "unet_norm_groups": 4, "unet_head_channels": 4, "rrdb_features": 4,
        "rrdb_blocks": 1, "rrdb_growth_channels": 2, "batch_size": 4, "val_batch_size": 4,
        "num_val_generations": 2, "val_inference_steps": 3, "amp": False,
    },
}  # fmt: skip


def latent_bundle_configs(method: str) -> Path:
    """The config folder of ``bundles/<method>``."""
    return REPO / "bundles" / method / "configs"


def latent_overrides(method: str, dataset_dir: str, root: Path, **extra) -> dict:
    """Small network, 1 epoch with validation; the bundle's own relative output paths are kept.

    The MLflow store gets an absolute URI: MLflow caches one store per URI string, so the bundle's relative
    ``sqlite:///mlruns.db`` would keep writing to the first test's folder after a change of directory.
    """
    return {
        "dataset_dir": dataset_dir, "demo_dir": None, "tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
        **SMALL_SETTINGS[method], "batch_size": 4, "max_epochs": 1, "val_interval": 1, **extra,
    }  # fmt: skip


def bundle_parser(configs: Path, *overlays: str) -> ConfigParser:
    """A parser of ``configs/train.json`` with the named overlays of the same folder on top."""
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), *(str(configs / name) for name in overlays)])
    return parser


def bundle_settings(small: dict, tmp_path: Path, dataset: str, **extra) -> dict:
    """``monai.bundle run`` overrides: the ``small`` network settings, the dataset, and outputs and MLflow
    store under ``tmp_path``."""
    return {
        **small, "dataset_dir": dataset, "demo_dir": None, "output_dir": str(tmp_path / "run"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", **extra,
    }  # fmt: skip


def link_bundles(folder: Path) -> None:
    """Make ``folder`` a place the bundles run from: they pull in ``bundles/common/configs`` with
    ``%bundles/common/...`` macros, which MONAI resolves relative to the working directory, so a test
    running a bundle from another folder links the repository's ``bundles/`` there."""
    link = Path(folder) / "bundles"
    if not link.exists():
        link.symlink_to(REPO / "bundles", target_is_directory=True)


def run_bundle(configs: Path, config_files: list[str], run_id: str, overrides: dict, cwd: Path) -> ConfigWorkflow:
    """``python -m monai.bundle run <run_id>`` in-process, from ``cwd`` (where runs/ and mlruns.db go)."""
    previous = os.getcwd()
    link_bundles(cwd)
    os.chdir(cwd)
    try:
        return run_bundle_here(configs, config_files, run_id, overrides)
    finally:
        os.chdir(previous)


def run_bundle_here(configs: Path, config_files: list[str], run_id: str, overrides: dict) -> ConfigWorkflow:
    """Initialise, run and finalise one workflow of the bundle whose config folder is ``configs``."""
    link_bundles(Path.cwd())
    workflow = ConfigWorkflow(
        config_file=config_files,
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        run_id=run_id,
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def mlflow_runs(root: Path, experiment: str) -> list:
    """The runs of ``experiment`` in the SQLite store ``root/mlruns.db``."""
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment '{experiment}'"
    return client.search_runs([exp.experiment_id])
