"""MLflow as its users expect (issue #18), read back from the SQLite store: a run logs its dataset as an input,
MLflow's source and git tags, and its experiment opens in MLflow 3's training view."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
from ignite.engine import Engine

from ambiseg_monai.handlers import GuardedMLFlowHandler, ProvenanceHandler
from ambiseg_monai.reporting import naming, provenance
from ambiseg_monai.reporting.report import _comparison_experiment_id

REPO = Path(__file__).resolve().parents[1]


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


def test_comparison_experiment_opens_in_the_training_view(tmp_path):
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
