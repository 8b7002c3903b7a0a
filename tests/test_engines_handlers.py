"""Small handlers and helpers used by the bundles: checkpoints, loss terms, phase lines, argv parsing, PNG grids."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from ambiseg_monai.bundle import inference_items, prepare_dataset
from ambiseg_monai.handlers import LossTerms, PhaseLogger, latest_checkpoint, render_sample_grid
from ambiseg_monai.reporting.provenance import config_files_from_argv


def test_latest_checkpoint_picks_the_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ("checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "model.pt", "checkpoint_final_iteration=99.pt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=10.pt"


def test_loss_terms_of_the_trainer_output():
    """Diffusion methods: the ``l_*`` terms of the training inferer's output."""
    terms = LossTerms()
    output = {"loss": torch.tensor(1.5, requires_grad=True), "pred": {"l_simple": torch.tensor([1.0, 3.0]), "x_t": 0}}
    assert terms(output) == {"loss": 1.5, "l_simple": 2.0}
    assert terms([output]) == {"loss": 1.5, "l_simple": 2.0}
    with pytest.raises(ValueError, match="'loss'"):
        terms({"pred": {}})


def test_loss_terms_of_a_loss_that_records_them():
    """Latent-variable models: the terms come from the loss object's ``last_terms``, same names as recorded."""

    class RecordingLoss:
        last_terms = {"loss": 2.0, "reconstruction": 1.5, "kl": 0.05}

    terms = LossTerms(RecordingLoss())
    output = {"loss": torch.tensor(2.0), "pred": {"logits": torch.zeros(1), "kl": torch.zeros(1)}}
    assert terms(output) == {"loss": 2.0, "reconstruction": 1.5, "kl": 0.05}
    assert list(terms([output])) == ["loss", "reconstruction", "kl"]
    with pytest.raises(TypeError, match="no 'last_terms'"):
        LossTerms(torch.nn.MSELoss())


def test_phase_logger_reports_an_evaluation_s_metrics_without_epoch_or_best_value(caplog):
    """evaluate.json's phases: a line when each starts, its metrics (key metric first) when it ends; no
    evaluator epoch, no "best" value (issue #18)."""
    engine = Engine(lambda engine, batch: None)
    engine.state.key_metric_name = "ged"

    @engine.on(Events.EPOCH_COMPLETED)
    def metrics(engine):  # as the metric handlers, and with a value that is not one number
        engine.state.metrics.update({"ci": 0.25, "ged": torch.tensor(1.23456), "dmax": 0.5, "per_image": [1, 2]})

    PhaseLogger("evaluation", num_samples=16, split="test", metrics=True).attach(engine)
    with caplog.at_level(logging.INFO, logger="ambiseg"):
        engine.run([0, 1], max_epochs=1)
    started, ended = (record.getMessage() for record in caplog.records)
    assert started == "evaluation (N = 16 samples per image, split 'test')"
    assert ended.startswith("results of evaluation (N = 16 samples per image, split 'test'): ")
    assert ended.split("): ", 1)[1].rsplit(" [", 1)[0] == "ged 1.2346, ci 0.2500, dmax 0.5000"
    assert "epoch" not in ended.lower() and "best" not in ended.lower()
    # validation during training leaves its metrics line to StatsHandler
    caplog.clear()
    validator = Engine(lambda engine, batch: None)
    PhaseLogger("validation", num_samples=4).attach(validator)
    with caplog.at_level(logging.INFO, logger="ambiseg"):
        validator.run([0], max_epochs=1)
    assert [record.getMessage() for record in caplog.records] == ["validation after epoch 1 (N = 4 samples per image)"]


def test_config_files_from_argv_reads_monai_bundle_command_lines():
    argv = ["training", "--config_file", "['a/train.json', 'a/lidc.json']", "--max_epochs", "3", "--resume=false"]
    files, overrides = config_files_from_argv(argv)
    assert files == ["a/train.json", "a/lidc.json"]
    assert overrides == {"max_epochs": 3, "resume": "false"}
    assert config_files_from_argv(["training", "--config_file", "x.json"])[0] == ["x.json"]


def test_render_sample_grid_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    path = render_sample_grid(
        rng.normal(size=(2, 1, 8, 8)),
        (rng.random((2, 3, 8, 8)) > 0.5).astype(np.float32),
        (rng.random((2, 4, 8, 8)) > 0.5).astype(np.float32),
        tmp_path / "grid.png",
        rater_mask=np.array([[True, True, False], [True, True, True]]),
        case_ids=["a", "b"],
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prepare_dataset_never_fills_a_non_demo_folder(tmp_path):
    with pytest.raises(Exception, match="no datalist"):
        prepare_dataset(tmp_path / "not_there", image_channels=1, demo_dir=tmp_path / "demo")
    assert not (tmp_path / "not_there").exists()


def test_inference_items_from_folder_and_dataset(small_demo_dataset, tmp_path):
    items = inference_items(small_demo_dataset)
    assert [i["case_id"] for i in items][:1] == ["demo_tes_0000"] and items[0]["image"] == items[0]["image_path"]
    with pytest.raises(ValueError, match="holds no NIfTI image"):
        inference_items(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        inference_items(tmp_path / "missing")
