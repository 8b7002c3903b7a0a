"""A bundle's untrained tiny network logged as an MLflow model (no training): shared by the MLflow model tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import torch
from _bundle_runner import REPO, SMALL_SETTINGS, link_bundles
from monai.bundle import ConfigParser

from ambiseg_monai.reporting.mlflow_model import LoggedSegmentationModel, log_segmentation_model, model_bundle_config

COMPONENTS = ("network_def", "infer#inferer", "infer#postprocessing")


@dataclass
class TinyModel:
    """A logged model and what it was made from."""

    logged: LoggedSegmentationModel
    tracking_uri: str
    folder: str  # the model folder (local store): what mlflow.pyfunc.load_model takes without a tracking URI
    network: torch.nn.Module  # the eager network whose weights were logged
    config: dict[str, Any]  # the model's self-contained config
    parser: ConfigParser  # the training parser (dataset values resolved)


def bundle_parsers(bundle: str, dataset: str, **overrides) -> tuple[ConfigParser, ConfigParser]:
    """The parsed training config (small network, the dataset) and the bundle's inference.json (macros resolved),
    read from the repository root (the ``%bundles/common/...`` macros are relative to the working directory)."""
    previous = os.getcwd()
    os.chdir(REPO)
    try:
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
        parser.update({**SMALL_SETTINGS[bundle], "dataset_dir": dataset, "demo_dir": None, **overrides})
        parser.parse()
        inference = ConfigParser()
        inference.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
        inference.resolve_macro_and_relative_ids()
    finally:
        os.chdir(previous)
    return parser, inference


def log_tiny_model(bundle: str, dataset: str, root: Path, seed: int = 0) -> TinyModel:
    """Log the bundle's small network (random weights, ``seed``) as an MLflow model to a new run of the SQLite store
    ``root/mlruns.db`` (artifacts under ``root/artifacts``)."""
    link_bundles(root)
    parser, inference = bundle_parsers(bundle, dataset)
    config = model_bundle_config(parser.get(), inference.get(), COMPONENTS, parser.get_parsed_content)
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def", instantiate=True, lazy=False).eval()
    tracking_uri = f"sqlite:///{root / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(bundle, artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(experiment_id, run_name=f"{bundle}_tiny")
    logged = log_segmentation_model(client, run.info.run_id, config, network.state_dict(), (1, 16, 16))
    client.set_terminated(run.info.run_id)
    folder = url2pathname(urlparse(client.get_logged_model(logged.model_id).artifact_location).path)
    return TinyModel(logged, tracking_uri, folder, network, config, parser)
