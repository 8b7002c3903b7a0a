"""MLflow as its users expect (issue #18), read back from the SQLite store: a training logs its trained model as an
MLflow model (switch ``log_mlflow_model``), its dataset as an input, MLflow's source and git tags, and its
experiment is tagged as an MLflow 3 model-training experiment.

The README's main command runs with a tiny budget as a subprocess, from the repository root, as a user runs it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import pytest
import torch
from _bundle_runner import SMALL_SETTINGS
from ignite.engine import Engine, Events

from ambiseg_monai.handlers import GuardedMLFlowHandler, MLflowModelLogger, ProvenanceHandler
from ambiseg_monai.reporting import naming, provenance
from ambiseg_monai.reporting.report import _comparison_experiment_id
from ambiseg_monai.reporting.tracking import sqlite_store_lock

REPO = Path(__file__).resolve().parents[1]
MAIN_CONFIG = "bundles/cimd/configs/train.json"
MONAI_CONFIG_TRUST_WARNING = re.compile(r"UserWarning: parsing config_file |^\s*workflow = create_workflow\($")


def _train(root: Path, dataset: str, bundle: str = "cimd", **extra) -> str:
    """``python -m monai.bundle run training --config_file bundles/<bundle>/configs/train.json`` (tiny budget)."""
    settings = {
        **SMALL_SETTINGS[bundle], "amp": False, "max_epochs": 1, "iterations_per_epoch": 2, "val_interval": 1,
        "dataset_dir": dataset, "output_dir": str(root / "run"), "tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
        **extra,
    }  # fmt: skip
    config = MAIN_CONFIG.replace("cimd", bundle)
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config]
    for key, value in settings.items():
        args += [f"--{key}", json.dumps(value)]
    result = subprocess.run(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _store(
    root: Path, bundle: str = "cimd"
) -> tuple[mlflow.MlflowClient, mlflow.entities.Experiment, mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    experiment = client.get_experiment_by_name(bundle)
    (run,) = client.search_runs([experiment.experiment_id])
    return client, experiment, run


@pytest.fixture(scope="module")
def training(small_demo_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked_training")
    return root, _train(root, small_demo_dataset)


def test_training_logs_the_model_it_would_infer_with(training):
    root, output = training
    client, experiment, run = _store(root)
    (output_model,) = run.outputs.model_outputs
    model = client.get_logged_model(output_model.model_id)
    assert model.status == mlflow.entities.LoggedModelStatus.READY and model.source_run_id == run.info.run_id
    assert model.name == "model" and output_model.step == 1  # the epoch of the best checkpoint
    assert model.tags["ambiseg.weights"] == "model.pt, best ged at epoch 1" and model.tags["ambiseg.bundle"] == "cimd"
    assert model.tags["ambiseg.sampler"] == "infer#inferer of bundles/cimd/configs/inference.json"
    assert "ged" in {metric.key for metric in model.metrics}  # the validation metrics of that epoch
    # one line, before the summary, with the URI and the serve command; no warning
    (line,) = [line for line in output.splitlines() if "MLflow model: " in line]
    assert f"models:/{model.model_id} (model.pt, best ged at epoch 1; logged in " in line
    serve = f"mlflow models serve -m models:/{model.model_id} --env-manager local"
    assert line.endswith(f"serve it with: MLFLOW_TRACKING_URI=sqlite:///{root / 'mlruns.db'} {serve}")
    seconds = float(re.search(r"logged in ([0-9.]+) s", line).group(1))
    print(f"model logged in {seconds} s")
    if importlib.util.find_spec("holoscan") is None:
        warnings = [
            line
            for line in output.splitlines()
            if re.search("warn", line, re.I) and not MONAI_CONFIG_TRUST_WARNING.search(line)
        ]
        assert not warnings, "\n".join(warnings)

    # the weights are the EMA entry of the best checkpoint (ckpt_load_dict {"ema": network}), as inference loads
    folder = url2pathname(urlparse(model.artifact_location).path)
    pyfunc = mlflow.pyfunc.load_model(folder, model_config={"device": "cpu"})
    network = pyfunc.unwrap_python_model().network
    best = torch.load(root / "run" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert network.state_dict().keys() == best["ema"].keys()
    assert all(torch.equal(network.state_dict()[k], best["ema"][k]) for k in best["ema"])
    assert any(not torch.equal(best["ema"][k], best["network"][k]) for k in best["ema"])  # EMA, not the raw weights
    # the sampler is inference.json's (16 samples, 50 steps), the images are the training images' size
    params = {p.name: p.default for p in pyfunc.metadata.signature.params.params}
    assert params == {"num_samples": 16, "num_inference_steps": 50, "seed": 0}
    assert pyfunc.metadata.signature.inputs.inputs[0].shape == (-1, 1, 16, 16)
    out = pyfunc.predict(torch.rand(1, 1, 16, 16).numpy(), params={"num_samples": 2, "num_inference_steps": 2})
    assert out["masks"].shape == (1, 2, 16, 16)


def test_training_logs_its_dataset_source_and_git_tags(training, small_demo_dataset):
    root, _ = training
    _, experiment, run = _store(root)
    assert experiment.tags[naming.TAG_EXPERIMENT_KIND] == naming.EXPERIMENT_KIND == "custom_model_development"
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == MAIN_CONFIG
    assert tags.get("mlflow.source.git.commit") == provenance.git_commit()  # None outside a git checkout
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    datalist = Path(small_demo_dataset) / "datalist.json"
    assert dataset.name == "small_demo" and dataset.source_type == "local"
    assert dataset.digest == provenance.datalist_sha256(small_demo_dataset)[:16]
    assert json.loads(dataset.source) == {"uri": str(datalist.resolve())}
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    profile = json.loads(dataset.profile)
    assert profile["num_training"] == 8 and profile["num_validation"] == 4 and profile["num_test"] == 4
    assert profile["num_raters"] == 4 and profile["datalist_name"] == "demo"


def test_the_switch_turns_model_logging_off(small_demo_dataset, tmp_path):
    output = _train(tmp_path, small_demo_dataset, log_mlflow_model=False, iterations_per_epoch=1)
    client, _, run = _store(tmp_path)
    assert run.outputs is None or not run.outputs.model_outputs
    assert client.search_logged_models([run.info.experiment_id]) == []
    assert "MLflow model: " not in output


def test_latent_model_training_logs_its_plain_best_checkpoint(small_demo_dataset, tmp_path):
    """The Probabilistic U-Net's model.pt is the network's state dict itself (a best_model_dict of one entry)."""
    output = _train(tmp_path, small_demo_dataset, bundle="prob_unet")
    client, _, run = _store(tmp_path, "prob_unet")
    (output_model,) = run.outputs.model_outputs
    model = client.get_logged_model(output_model.model_id)
    assert model.tags["ambiseg.weights"] == "model.pt, best ged at epoch 1" and "MLflow model: models:/" in output
    pyfunc = mlflow.pyfunc.load_model(url2pathname(urlparse(model.artifact_location).path))
    best = torch.load(tmp_path / "run" / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = pyfunc.unwrap_python_model().network.state_dict()
    assert state.keys() == best.keys() and all(torch.equal(state[k].cpu(), best[k]) for k in best)
    out = pyfunc.predict(torch.rand(2, 1, 16, 16).numpy(), params={"num_samples": 3})
    assert out["masks"].shape == (2, 3, 16, 16)


def test_model_logger_without_inference_config_or_best_checkpoint(small_demo_dataset, tmp_path, caplog):
    """Without inference.json the model samples as the validation does; without model.pt (no validation ran) it
    takes the newest training checkpoint; without any checkpoint it warns and the training is not disturbed."""
    from _tiny_mlflow_model import bundle_parsers

    parser, _ = bundle_parsers("cimd", small_demo_dataset)
    network = parser.get_parsed_content("network_def")
    models = tmp_path / "models"
    models.mkdir()
    mlflow_handler = GuardedMLFlowHandler(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}", experiment_name="cimd")
    logger = MLflowModelLogger(mlflow_handler, models / "model.pt", inference_config=tmp_path / "none.json",
                               config=parser.get())  # fmt: skip
    assert logger.checkpoint_key == "ema"  # the config's ckpt_load_dict
    engine = _engine()
    engine.state.epoch, engine.state.batch = 3, {"image": torch.zeros(2, 1, 16, 16)}
    logger._record_image_shape(engine)
    mlflow_handler.start(engine)
    with caplog.at_level("WARNING"):
        logger(engine)
    assert "the trained model was not logged to MLflow: FileNotFoundError: neither" in caplog.text
    assert logger.model_uri is None

    torch.save({"network": network.state_dict(), "ema": network.state_dict()}, models / "checkpoint_epoch=3.pt")
    logger(engine)
    client = mlflow_handler.client
    model = client.get_logged_model(logger.model_uri.removeprefix("models:/"))
    assert model.tags["ambiseg.weights"] == "checkpoint_epoch=3.pt, no validation has written model.pt"
    assert model.tags["ambiseg.sampler"].startswith("validate#inferer (FileNotFoundError: no inference config")
    pyfunc = mlflow.pyfunc.load_model(url2pathname(urlparse(model.artifact_location).path))
    # the validation's sampler: num_val_samples 2, val_inference_steps 2 (the tests' small settings)
    params = {p.name: p.default for p in pyfunc.metadata.signature.params.params}
    assert params == {"num_samples": 2, "num_inference_steps": 2, "seed": 0}
    assert pyfunc.predict(torch.rand(1, 1, 16, 16).numpy())["masks"].shape == (1, 2, 16, 16)
    (output,) = client.get_run(mlflow_handler.cur_run.info.run_id).outputs.model_outputs
    assert output.step == 3  # no validator: the last epoch

    off = MLflowModelLogger(mlflow_handler, models / "model.pt", enabled="False")
    off.attach(engine)
    assert not engine.has_event_handler(off, Events.COMPLETED)


def _engine() -> Engine:
    engine = Engine(lambda engine, batch: None)
    engine.state.max_epochs, engine.state.iteration, engine.state.epoch = 1, 0, 0
    return engine


def test_evaluation_logs_its_dataset_once_and_tags_its_experiment(small_demo_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    runs = []
    for _ in range(2):  # a second process logging into the same run (a resumed run) adds nothing
        handler = GuardedMLFlowHandler(tracking_uri=uri, experiment_name="cimd_eval", run_name="eval")
        ProvenanceHandler(config={"lr": 0.1}, dataset_dir=small_demo_dataset, mlflow_handler=handler,
                          run_kind="evaluation").started(_engine())  # fmt: skip
        runs.append(handler.cur_run.info.run_id)
    assert runs[0] == runs[1]
    client = mlflow.MlflowClient(uri)
    run = client.get_run(runs[0])
    (dataset_input,) = run.inputs.dataset_inputs
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "evaluation")]
    assert dataset_input.dataset.digest == provenance.datalist_sha256(small_demo_dataset)[:16]
    # no command line: the source is the script, as mlflow.start_run names it
    assert run.data.tags["mlflow.source.name"] == sys.argv[0] and run.data.tags["mlflow.source.type"] == "LOCAL"
    experiment = client.get_experiment_by_name("cimd_eval")
    assert experiment.tags[naming.TAG_EXPERIMENT_KIND] == "custom_model_development"


def test_an_experiment_kind_already_set_is_kept(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    chosen = client.create_experiment("chat", tags={naming.TAG_EXPERIMENT_KIND: "genai_development"})
    assert provenance.mark_training_experiment(client, chosen) is False
    assert client.get_experiment(chosen).tags[naming.TAG_EXPERIMENT_KIND] == "genai_development"
    plain = client.create_experiment("plain")
    assert provenance.mark_training_experiment(client, plain) is True
    assert client.get_experiment(plain).tags[naming.TAG_EXPERIMENT_KIND] == "custom_model_development"


def test_comparison_experiment_is_a_model_training_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = _comparison_experiment_id(client, naming.COMPARISON_EXPERIMENT, uri)
    assert client.get_experiment(experiment_id).tags[naming.TAG_EXPERIMENT_KIND] == "custom_model_development"


def test_source_tags_leave_the_commit_out_outside_a_git_checkout(monkeypatch):
    monkeypatch.setattr(provenance, "_checkout_git", lambda *args: None)
    provenance.git_commit.cache_clear()
    try:
        tags = provenance.source_tags(["bundles/cimd/configs/train.json", "bundles/cimd/configs/lidc.json"])
        assert tags == {"mlflow.source.type": "LOCAL", "mlflow.source.name": "bundles/cimd/configs/train.json"}
    finally:
        provenance.git_commit.cache_clear()


def test_source_tags_name_the_config_and_the_commit_of_the_checkout():
    tags = provenance.source_tags(["bundles/cimd/configs/train.json"])
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == "bundles/cimd/configs/train.json"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    if provenance.git_commit() is None:  # an installed package, not a checkout
        assert "mlflow.source.git.commit" not in tags
    else:
        assert tags["mlflow.source.git.commit"] == provenance.git_commit() == head.stdout.strip()


_OPEN_STORE_TOGETHER = """
import sys, time
from pathlib import Path
from monai.handlers import MLFlowHandler
from ambiseg_monai.handlers import GuardedMLFlowHandler
from ambiseg_monai.reporting import resolve_tracking_uri
folder, index, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(folder / f"ready-{index}").touch()
while len(list(folder.glob("ready-*"))) < count:  # start together, after the slow imports
    time.sleep(0.01)
uri = f"sqlite:///{folder / 'mlruns.db'}"
if index == "0":  # a training's handler
    GuardedMLFlowHandler(tracking_uri=uri, experiment_name="cimd")
else:  # evaluate.json: MONAI's handler on the URI the bundle resolved
    MLFlowHandler(tracking_uri=resolve_tracking_uri(uri), experiment_name="cimd")
"""


def test_runs_started_together_on_a_new_store_create_it_once(tmp_path):
    """Trainings and evaluations started at once on a fresh checkout all create ``mlruns.db``: without the store
    lock the later ones' schema migrations fail (``table alembic_version already exists``, ``Online migration expected to match
    one row``)."""
    count = 3
    processes = [
        subprocess.Popen([sys.executable, "-c", _OPEN_STORE_TOGETHER, str(tmp_path), str(i), str(count)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for i in range(count)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0] * count, "\n".join(o[-2000:] for o in outputs)
    assert not any("already exists" in output for output in outputs)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert client.search_experiments()  # a usable store (its Default experiment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns.db", "ready-0", "ready-1", "ready-2"]


def test_a_store_held_too_long_by_another_process_is_a_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with sqlite_store_lock(uri):  # a second lock on the same file blocks, as another process's would
        with pytest.raises(TimeoutError, match=r"opening the MLflow store .*mlruns\.db for over 0 s"):
            with sqlite_store_lock(uri, timeout=0.2):
                pass
    with sqlite_store_lock(uri, timeout=0.2), sqlite_store_lock("http://127.0.0.1:5000", timeout=0.2):
        pass  # released again; servers are not locked
