"""Sample grids (``SampleGridHandler``): colour bars on the mean and variance, titles naming the method, run,
phase and N, and each grid logged to MLflow once (issue #18)."""

from __future__ import annotations

import mlflow
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from ambiseg_monai.handlers import SampleGridHandler, sample_grid_figure, sample_images

BATCH = 2


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("grids")
    uri = f"sqlite:///{root}/mlruns.db"
    mlflow.MlflowClient(uri).search_experiments()  # creates the store once (schema migrations take seconds)
    return uri


def run_evaluator(handlers, num_samples: int) -> Engine:
    """One iteration of an engine whose output is what the bundles' evaluators produce."""
    generator = torch.Generator().manual_seed(0)
    output = {
        "image": torch.rand(BATCH, 1, 8, 8, generator=generator),
        "label": (torch.rand(BATCH, 3, 8, 8, generator=generator) > 0.5).float(),
        "pred": (torch.rand(BATCH, num_samples, 8, 8, generator=generator) > 0.5).float(),
    }
    engine = Engine(lambda engine, batch: output)
    for handler in handlers:
        handler.attach(engine)
    engine.run([{"case_id": ["case_a", "case_b"]}], max_epochs=1)
    return engine


def all_artifacts(client: mlflow.MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    paths = []
    for info in client.list_artifacts(run_id, folder):
        paths += all_artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return paths


@pytest.fixture
def figures(monkeypatch):
    """The figures the handlers save, by file name."""
    saved = {}
    save = sample_images.save_figure

    def keep(fig, path, dpi):
        saved[path.name] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(sample_images, "save_figure", keep)
    return saved


def colour_bars(fig) -> list:
    return [axis for axis in fig.axes if axis.get_label() == "<colorbar>"]


def test_sample_grid_has_colour_bars_on_mean_and_variance():
    samples = (torch.rand(BATCH, 4, 8, 8) > 0.5).float().numpy()
    fig = sample_grid_figure(torch.rand(BATCH, 1, 8, 8).numpy(), None, samples, title="cimd · run — epoch 3")
    assert fig.get_suptitle() == "cimd · run — epoch 3"
    bars = colour_bars(fig)
    assert len(bars) == 2 * BATCH  # mean and variance of every row
    # binary samples: mean in [0, 1], variance p(1 - p) in [0, 0.25]
    assert [tuple(bar.get_ylim()) for bar in bars[:2]] == [(0.0, 1.0), (0.0, 0.25)]
    panels = [axis.get_title() for axis in fig.axes if axis.get_label() != "<colorbar>"][: 1 + 4 + 2]
    assert panels == ["image", "sample 1", "sample 2", "sample 3", "sample 4", "mean", "variance"]


def test_evaluation_grid_is_titled_by_phase_and_logged_once(tracking_uri, tmp_path, figures):
    out = tmp_path / "eval"
    # as evaluate.json: the MLflow handler logs the whole evaluation folder when the evaluator completes
    mlflow_handler = MLFlowHandler(
        tracking_uri=tracking_uri,
        experiment_name="cimd",
        run_name="cimd_eval",
        iteration_log=False,
        epoch_log=False,
        artifacts=str(out),
        close_on_complete=True,
    )
    grid = SampleGridHandler(out, mlflow_handler, prefix="n16_samples", phase="evaluation", split="test")
    run_evaluator([mlflow_handler, grid], num_samples=16)
    assert [p.name for p in grid.written] == ["n16_samples.png"]
    fig = figures["n16_samples.png"]
    assert fig.get_suptitle() == "cimd · cimd_eval — evaluation, test split, N = 16 samples per image"
    assert len(colour_bars(fig)) == 2 * BATCH
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cimd").experiment_id])
    assert all_artifacts(client, run.info.run_id) == ["n16_samples.png"]


def test_validation_grid_is_titled_by_epoch_and_logged_once(tracking_uri, tmp_path, figures):
    mlflow_handler = MLFlowHandler(
        tracking_uri=tracking_uri,
        experiment_name="prob_unet",
        run_name="prob_unet_train",
        iteration_log=False,
        epoch_log=False,
        close_on_complete=True,
    )
    grid = SampleGridHandler(tmp_path / "samples", mlflow_handler)
    run_evaluator([mlflow_handler, grid], num_samples=4)
    fig = figures["samples_epoch0001.png"]
    assert fig.get_suptitle() == "prob_unet · prob_unet_train — epoch 1, N = 4 samples per image"
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("prob_unet").experiment_id])
    assert all_artifacts(client, run.info.run_id) == ["samples/samples_epoch0001.png"]
    # without an MLflow run the title still says what the grid shows
    assert SampleGridHandler(tmp_path, name="my method").title(Engine(lambda e, b: None), 8).startswith("my method — ")
