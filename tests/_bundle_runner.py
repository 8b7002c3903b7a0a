"""Run a bundle in-process (like ``python -m monai.bundle run``) and read its MLflow runs: shared by the
latent-model bundle tests."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from monai.bundle import ConfigWorkflow


REPO = Path(__file__).resolve().parents[1]


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
