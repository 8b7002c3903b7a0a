"""Fault injection for training checkpoints: kills while a checkpoint or the best model is written, kills
during training and validation, unreadable checkpoints, a lost best model, a changed learning rate, pruning.

A kill is simulated in-process by raising :class:`Killed`, a ``BaseException`` that no ``except Exception``
absorbs; a kill while a file is written, by a ``torch.save`` that writes the first half of the file and then
raises it. ``finally`` clean-up still runs, unlike after SIGKILL, so the checkpoint-write test also plants the
temporary file a real kill leaves. Bundle runs use the Probabilistic U-Net bundle on the 16 x 16 demo fixture
(8 training cases, batch 4: 2 iterations per epoch); a resumed run must end with the uninterrupted run's
weights bit for bit.
"""

from __future__ import annotations

import io
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow

from ambiseg_monai.bundle.config import merged_config
from ambiseg_monai.handlers import AtomicCheckpointSaver, RequiredCheckpointLoader, ResumableCheckpointer, atomic_save

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
TRAIN = str(BUNDLES / "prob_unet" / "configs" / "train.json")
LOGGER = "ambiseg_monai.handlers.checkpoint"


@pytest.fixture
def checkpoint_log():
    """Records of the checkpoint module's logger, as (level, message).

    Collected by a handler on that logger (not pytest's ``caplog``, which sits on the root logger: a bundle
    run applies its ``logging.conf``, which replaces the root logger's handlers).
    """
    records: list[tuple[int, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelno, record.getMessage()))

    logger = logging.getLogger(LOGGER)
    handler, level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _warnings(records: list[tuple[int, str]]) -> list[str]:
    return [message for level, message in records if level == logging.WARNING]


class Killed(BaseException):
    """Stands for SIGKILL: nothing handles it on the way out."""


def _kill(engine=None) -> None:
    raise Killed()


def _killing_save(monkeypatch, should_kill) -> None:
    """Make ``torch.save(obj, f)`` write half of the file and die when ``should_kill(obj)``."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if not should_kill(obj):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(half)
        else:
            f.write(half)
            f.flush()
        raise Killed("killed while writing a checkpoint")

    monkeypatch.setattr(torch, "save", save)


# ------------------------------------------------------------------------------------------------------
# units: atomic writes, the best-model saver, a tiny trainer


def test_atomic_save_keeps_the_old_file_when_the_write_is_killed(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(3)}, path)
    _killing_save(monkeypatch, lambda obj: True)
    with pytest.raises(Killed):
        atomic_save({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # the temporary file is gone
    assert path.stat().st_mode & 0o044  # group/others may read it, as with a plain torch.save


def test_best_model_survives_a_kill_while_it_is_replaced(tmp_path, monkeypatch):
    network = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(network.weight, 1.0)
    evaluator = Engine(lambda engine, batch: None)
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"network": network},
        save_key_metric=True,
        key_metric_name="ged",
        key_metric_negative_sign=True,
        key_metric_filename="model.pt",
    )
    evaluator.state.metrics = {"ged": 0.5}
    saver.metrics_completed(evaluator)
    first = torch.load(tmp_path / "model.pt", weights_only=True)

    torch.nn.init.constant_(network.weight, 2.0)
    evaluator.state.metrics = {"ged": 0.3}  # better: model.pt is replaced
    _killing_save(monkeypatch, lambda obj: True)
    with pytest.raises(Killed):
        saver.metrics_completed(evaluator)
    kept = torch.load(tmp_path / "model.pt", weights_only=True)  # MONAI's saver deleted it first
    assert torch.equal(kept["weight"], first["weight"])
    monkeypatch.undo()
    saver.metrics_completed(evaluator)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], torch.full((1, 2), 2.0))


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_evaluation_of_a_damaged_best_model_says_so(tmp_path, keep):
    network = torch.nn.Linear(2, 1)
    path = tmp_path / "model.pt"
    atomic_save(network.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    loader = RequiredCheckpointLoader(str(path), {"network": network})
    with pytest.raises(ValueError, match=r"model\.pt \(\d+ bytes\) cannot be read .*damaged.*re-run the training"):
        loader(Engine(lambda engine, batch: None))  # used to be a bare EOFError / zip reader error


@pytest.mark.parametrize("bundle", ["cimd", "consensus_diffusion", "ambdiffseg", "prob_unet", "phiseg", "ssn"])
def test_every_bundle_writes_its_best_model_atomically(bundle):
    config = merged_config([BUNDLES / bundle / "configs" / "train.json"], root=BUNDLES.parent)  # with bundles/common
    savers = [h for h in config["validate"]["handlers"] if isinstance(h, dict) and h.get("save_key_metric")]
    assert [h["_target_"] for h in savers] == ["ambiseg_monai.handlers.AtomicCheckpointSaver"]
    assert config["train"]["handlers"][0]["_target_"] == "ambiseg_monai.handlers.ResumableCheckpointer"


def _epoch_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint_epoch=*.pt"))


def _tiny_trainer(ckpt_dir: Path, lr: float = 0.01, **checkpointer_args):
    """A 1-layer trainer whose steps draw from torch, NumPy and Python RNGs; 2 iterations per epoch."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    network = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)

    def step(engine, batch):
        optimizer.zero_grad()
        noisy = batch + torch.randn_like(batch) + float(np.random.rand()) + random.random()
        loss = network(noisy).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = Engine(step)
    checkpointer = ResumableCheckpointer(ckpt_dir, {"network": network, "optimizer": optimizer}, **checkpointer_args)
    checkpointer.attach(engine)
    return engine, network, checkpointer


DATA = [torch.ones(2, 3), torch.full((2, 3), 2.0)]


def test_tiny_trainer_resumed_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    reference, reference_net, _ = _tiny_trainer(tmp_path / "reference")
    reference.run(DATA, max_epochs=3)

    engine, _, _ = _tiny_trainer(tmp_path / "killed")
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=5), _kill)
    with pytest.raises(Killed):
        engine.run(DATA, max_epochs=3)
    engine, network, checkpointer = _tiny_trainer(tmp_path / "killed")  # a new process re-seeds everything
    engine.run(DATA, max_epochs=3)
    assert checkpointer.loaded_from.name == "checkpoint_epoch=2.pt"
    assert torch.equal(network.weight, reference_net.weight) and torch.equal(network.bias, reference_net.bias)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage, checkpoint_log):
    engine, _, _ = _tiny_trainer(tmp_path)
    engine.run(DATA, max_epochs=2)
    newest = tmp_path / "checkpoint_epoch=2.pt"
    data = newest.read_bytes()
    newest.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint"}[damage])

    engine, _, checkpointer = _tiny_trainer(tmp_path)
    engine.run(DATA, max_epochs=2)  # used to die with a bare EOFError / zip error
    assert checkpointer.skipped == [newest]
    assert checkpointer.loaded_from == tmp_path / "checkpoint_epoch=1.pt"
    assert any("checkpoint_epoch=2.pt" in w for w in _warnings(checkpoint_log))
    assert any("resumed from" in m and "checkpoint_epoch=1.pt" in m for _, m in checkpoint_log)
    assert engine.state.epoch == 2
    torch.load(newest, weights_only=True)  # epoch 2 was trained again and saved over the damaged file


def test_old_epoch_checkpoints_are_pruned_across_restarts(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"best")  # not an epoch checkpoint: never pruned
    engine, _, _ = _tiny_trainer(tmp_path, keep_last=2)
    engine.run(DATA, max_epochs=3)
    assert _epoch_files(tmp_path) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]
    engine, _, _ = _tiny_trainer(tmp_path, keep_last=1)
    engine.run(DATA, max_epochs=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=5.pt", "model.pt"]


def test_changed_learning_rate_on_resume_is_reported(tmp_path, checkpoint_log):
    engine, _, _ = _tiny_trainer(tmp_path, lr=0.001)
    engine.run(DATA, max_epochs=1)
    engine, network, _ = _tiny_trainer(tmp_path, lr=0.005)
    engine.run(DATA, max_epochs=2)
    (warning,) = _warnings(checkpoint_log)
    assert "'optimizer' lr" in warning and "0.005" in warning and "0.001" in warning
    assert "checkpoint_epoch=1.pt" in warning


def test_grad_scaler_state_is_checkpointed(tmp_path):
    engine, _, _ = _tiny_trainer(tmp_path)
    engine.scaler = torch.amp.GradScaler("cpu")
    engine.scaler.load_state_dict(
        {"scale": 512.0, "growth_factor": 3.0, "backoff_factor": 0.25, "growth_interval": 7, "_growth_tracker": 4}
    )
    engine.run(DATA, max_epochs=1)
    engine, _, _ = _tiny_trainer(tmp_path)
    engine.scaler = torch.amp.GradScaler("cpu")
    engine.run(DATA, max_epochs=2)
    state = engine.scaler.state_dict()
    assert (state["scale"], state["growth_interval"], state["_growth_tracker"]) == (512.0, 7, 4)


# ------------------------------------------------------------------------------------------------------
# the bundle: kills during training, validation and checkpoint writes


def _workflow(dataset: str, root: Path, **overrides) -> ConfigWorkflow:
    """An initialised tiny prob_unet training (built, not run yet), writing to ``root/run``."""
    workflow = ConfigWorkflow(
        config_file=TRAIN,
        workflow_type=None,
        run_id="training",
        dataset_dir=dataset,
        demo_dir=None,
        output_dir=str(root / "run"),
        tracking_uri=f"sqlite:///{root.parent / 'mlruns.db'}",
        unet_channels=[8, 16],
        num_res_units=1,
        batch_size=4,
        **{"max_epochs": 3, "val_interval": 1, **overrides},
    )
    workflow.initialize()
    # build the trainer first, as the run does: the order of construction decides the random initial state
    workflow.parser.get_parsed_content("train#trainer")
    return workflow


def _record_validations(workflow: ConfigWorkflow) -> list[int]:
    epochs: list[int] = []
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(Events.COMPLETED, lambda engine: epochs.append(engine.state.epoch))
    return epochs


def _final_state(workflow: ConfigWorkflow) -> dict:
    models = Path(workflow.parser.get_parsed_content("ckpt_dir"))
    return {
        "network": {k: v.clone() for k, v in workflow.parser.get_parsed_content("network").state_dict().items()},
        "optimizer": workflow.parser.get_parsed_content("optimizer").state_dict()["state"],
        "best": torch.load(models / "model.pt", weights_only=True),
    }


def _assert_same(actual: dict, expected: dict) -> None:
    for part in ("network", "best"):
        assert actual[part].keys() == expected[part].keys()
        for key in expected[part]:
            assert torch.equal(actual[part][key], expected[part][key]), f"{part} {key} differs"
    for index, moments in expected["optimizer"].items():
        for key, value in moments.items():
            assert torch.equal(actual["optimizer"][index][key], value), f"optimizer {index} {key} differs"


@pytest.fixture(scope="module")
def uninterrupted(small_demo_dataset, tmp_path_factory):
    """3 epochs, validated after each; returns (its folder, its final state, the validated epochs)."""
    root = tmp_path_factory.mktemp("faults_ckpt") / "uninterrupted"
    workflow = _workflow(small_demo_dataset, root)
    validated = _record_validations(workflow)
    workflow.run()
    return root, _final_state(workflow), validated


def test_run_killed_during_training_resumes_to_the_same_weights(uninterrupted, small_demo_dataset, tmp_path):
    _, expected, _ = uninterrupted
    workflow = _workflow(small_demo_dataset, tmp_path / "killed")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=5), _kill)  # epoch 3
    with pytest.raises(Killed):
        workflow.run()

    resumed = _workflow(small_demo_dataset, tmp_path / "killed")
    resumed.run()
    checkpointer = resumed.parser.get_parsed_content("train#handlers")[0]
    assert checkpointer.loaded_from.name == "checkpoint_epoch=2.pt"
    _assert_same(_final_state(resumed), expected)  # bit for bit (differed by up to 1e-2)


def test_validation_killed_midway_runs_again_after_resume(uninterrupted, small_demo_dataset, tmp_path):
    _, expected, validated = uninterrupted
    assert validated == [1, 2, 3]
    workflow = _workflow(small_demo_dataset, tmp_path / "killed")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")

    def kill_in_epoch_2(engine):
        if engine.state.epoch == 2:
            raise Killed()

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, kill_in_epoch_2)
    with pytest.raises(Killed):
        workflow.run()

    resumed = _workflow(small_demo_dataset, tmp_path / "killed")
    validated_after_resume = _record_validations(resumed)
    resumed.run()
    assert validated_after_resume == [2, 3]  # used to be [3]: the validation of epoch 2 was lost
    _assert_same(_final_state(resumed), expected)  # the same best model too


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(
    small_demo_dataset, tmp_path, monkeypatch, checkpoint_log
):
    workflow = _workflow(small_demo_dataset, tmp_path / "run", max_epochs=2, val_interval=10)
    _killing_save(monkeypatch, lambda obj: isinstance(obj, dict) and obj.get("trainer", {}).get("iteration") == 4)
    with pytest.raises(Killed):
        workflow.run()
    monkeypatch.undo()
    models = tmp_path / "run" / "run" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=1.pt"]  # epoch 1 kept, nothing partial
    torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)
    leftover = models / ".checkpoint_epoch=2.pt.0123456789ab.tmp"  # what a real SIGKILL leaves
    leftover.write_bytes(b"partial")

    resumed = _workflow(small_demo_dataset, tmp_path / "run", max_epochs=2, val_interval=10)
    resumed.run()  # used to die: epoch 1 was deleted before epoch 2 was written
    assert resumed.parser.get_parsed_content("train#handlers")[0].loaded_from.name == "checkpoint_epoch=1.pt"
    assert resumed.parser.get_parsed_content("train#trainer").state.iteration == 4
    assert not leftover.exists()
    assert any("resumed from" in m and "checkpoint_epoch=1.pt" in m for _, m in checkpoint_log)


@pytest.mark.parametrize("damage", ["deleted", "empty"])
def test_lost_best_model_is_reported_and_rebuilt(uninterrupted, small_demo_dataset, tmp_path, damage, checkpoint_log):
    source, _, _ = uninterrupted
    shutil.copytree(source / "run", tmp_path / "copy" / "run")
    best = tmp_path / "copy" / "run" / "models" / "model.pt"
    if damage == "deleted":
        best.unlink()
    else:
        best.write_bytes(b"")
    workflow = _workflow(small_demo_dataset, tmp_path / "copy")  # finished: used to exit at once, model.pt lost
    validated = _record_validations(workflow)
    workflow.run()
    assert validated == [3]
    torch.load(best, weights_only=True)
    warnings = _warnings(checkpoint_log)
    assert any("best model lost" in w and "model.pt" in w and "cannot be recovered" in w for w in warnings)


def test_changed_learning_rate_of_a_resumed_bundle_run_is_reported(
    uninterrupted, small_demo_dataset, tmp_path, checkpoint_log
):
    source, _, _ = uninterrupted
    shutil.copytree(source / "run", tmp_path / "copy" / "run")
    workflow = _workflow(small_demo_dataset, tmp_path / "copy", max_epochs=4, val_interval=10, learning_rate=0.01)
    workflow.run()
    warnings = _warnings(checkpoint_log)
    assert len(warnings) == 1 and "'optimizer' lr" in warnings[0] and "0.01" in warnings[0] and "0.001" in warnings[0]
    assert workflow.parser.get_parsed_content("optimizer").param_groups[0]["initial_lr"] == 0.001
    models = tmp_path / "copy" / "run" / "models"
    assert _epoch_files(models) == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt"]  # 2 kept: epoch 2 pruned
