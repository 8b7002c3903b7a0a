"""Fault injection in training: a diverging run (NaN/Inf loss, gradient, weights or metric) and a tracking
server that dies mid-run.

- Every bundle's trainer carries a :class:`NonFiniteGuard`: a non-finite step is never applied, the run stops
  with a message naming the epoch and the iteration, ``python -m monai.bundle run`` exits non-zero, and no
  non-finite ``model.pt`` or checkpoint is written (used to: exit 0 with an all-NaN ``model.pt``).
- The bundles' MLflow handlers survive the server being killed mid-run: the run finishes, what could not be
  sent is in the offline store and the sync command merges it into the server's run (used to: ~4 minutes
  of retries, then exit 1 with nothing in the offline store).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from _bundle_runner import link_bundles
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointSaver, ValidationHandler
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric

from ambiseg_monai.handlers import NonFiniteGuard, NonFiniteTrainingError
from ambiseg_monai.reporting import tracking
from ambiseg_monai.reporting.sync import sync_runs

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"


# ------------------------------------------------------------------------------------------------
# the guard on a tiny trainer
# ------------------------------------------------------------------------------------------------
def _data(n: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 3, generator=generator), "label": torch.randn(2, 1, generator=generator)} for _ in range(n)]


class _NanAt:
    """MSE loss that is NaN at the given (1-based) call numbers."""

    def __init__(self, *calls: int, value: float = math.nan) -> None:
        self.calls, self.value, self.count = set(calls), value, 0

    def __call__(self, pred, target):
        self.count += 1
        loss = torch.nn.functional.mse_loss(pred, target)
        return loss * self.value if self.count in self.calls or "all" in self.calls else loss


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


class _OverflowingSGD(torch.optim.SGD):
    """SGD whose update overflows: finite loss and gradients, non-finite weights after the step."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.mul_(1e38).mul_(1e38)


def _trainer(loss, guard, max_epochs: int = 2, lr: float = 0.1, handlers=(), validator=None, network=None, optimizer=None):
    network = network or _network()
    optimizer = (optimizer or torch.optim.SGD)(network.parameters(), lr=lr)
    train_handlers = ([guard] if guard else []) + list(handlers)
    if validator is not None:
        train_handlers.append(ValidationHandler(validator=validator, interval=1, epoch_level=True))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=_data(), network=network,
        optimizer=optimizer, loss_function=loss, train_handlers=train_handlers, decollate=False,
    )
    return trainer, network


def test_nan_loss_stops_before_the_step_naming_epoch_and_iteration():
    trainer, network = _trainer(_NanAt(6), NonFiniteGuard())
    weights = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.update({e.state.iteration: network.weight.clone()}))
    with pytest.raises(NonFiniteTrainingError) as caught:
        trainer.run()
    message = str(caught.value)
    assert "epoch 2, iteration 6" in message and "the loss is nan" in message and "gradients of 2 of 2" in message
    assert "--learning_rate" in message and "--nonfinite_action skip" in message
    assert torch.equal(network.weight, weights[5]) and torch.isfinite(network.weight).all()  # step 6 not applied


def test_an_infinite_gradient_with_a_finite_loss_is_caught():
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * math.inf

    trainer, network = _trainer(lambda p, t: torch.nn.functional.mse_loss(InfGrad.apply(p), t), NonFiniteGuard())
    with pytest.raises(NonFiniteTrainingError, match=r"epoch 1, iteration 1: the gradients of 2 of 2 tensors are non-finite \(e\.g\. weight, bias\)"):
        trainer.run()
    assert torch.isfinite(network.weight).all()


def test_a_divergence_inside_the_forward_pass_is_named_as_such():
    """CIMD with --learning_rate 1000 used to end in a bare torch.distributions error."""

    class Latent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, x):
            scale = torch.exp(self.linear(x))  # 0 or inf once the weights have grown
            return torch.distributions.Normal(torch.zeros_like(scale), scale, validate_args=True).rsample()

    network = Latent()
    trainer, _ = _trainer(torch.nn.functional.mse_loss, NonFiniteGuard(), network=network)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: network.linear.weight.data.fill_(1e3))
    with pytest.raises(NonFiniteTrainingError, match=r"training diverged at epoch 1, iteration 2: the forward pass produced "
                       r"non-finite values \(ValueError: Normal got invalid values for scale\); the weights are finite"):
        trainer.run()
    trainer, _ = _trainer(lambda p, t: 1 / 0, NonFiniteGuard())
    with pytest.raises(ZeroDivisionError):  # other errors pass unchanged
        trainer.run()


def test_skip_mode_skips_the_bad_step_and_stops_after_too_many_in_a_row(caplog):
    guard = NonFiniteGuard(on_nonfinite="skip", max_consecutive_skips=2)
    trainer, network = _trainer(_NanAt(3), guard)
    weights = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.update({e.state.iteration: network.weight.clone()}))
    with caplog.at_level("WARNING"):
        trainer.run()  # completes
    assert trainer.state.iteration == 8 and guard.skipped_steps == 1
    assert torch.equal(weights[3], weights[2]) and not torch.equal(weights[4], weights[3])
    assert "skipped a non-finite training step at epoch 1, iteration 3: the loss is nan" in caplog.text

    guard = NonFiniteGuard(on_nonfinite="skip", max_consecutive_skips=2)
    trainer, network = _trainer(_NanAt("all"), guard)
    start = network.weight.clone()
    with pytest.raises(NonFiniteTrainingError, match=r"3 non-finite training steps in a row, the last at epoch 1, iteration 3"):
        trainer.run()
    assert torch.equal(network.weight, start)


def test_weights_made_non_finite_by_a_finite_gradient_stop_before_the_epoch_checkpoint(tmp_path):
    network = _network()
    saver = CheckpointSaver(save_dir=str(tmp_path), save_dict={"network": network}, save_interval=1, epoch_level=True)
    trainer, _ = _trainer(torch.nn.functional.mse_loss, NonFiniteGuard(), handlers=[saver], network=network,
                          optimizer=_OverflowingSGD)
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite weights after the optimiser step at epoch 1, iteration 1: the weights of the network"):
        trainer.run()
    assert not list(tmp_path.iterdir())


class _ConstantMetric(CumulativeIterationMetric):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def _compute_tensor(self, y_pred, y=None):
        return torch.zeros(y_pred.shape[0], 1)

    def aggregate(self):
        return torch.tensor(self.value)


def test_a_nan_validation_metric_is_never_a_new_best_and_writes_no_model(tmp_path, caplog):
    network = _network()
    validator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=_data(2), network=network, decollate=False,
        key_val_metric={"ged": IgniteMetricHandler(metric_fn=_ConstantMetric(math.nan), output_transform=lambda o: (o["pred"], o["label"]))},
        val_handlers=[CheckpointSaver(save_dir=str(tmp_path), save_dict={"network": network}, save_key_metric=True,
                                      key_metric_name="ged", key_metric_filename="model.pt")],
    )
    trainer, _ = _trainer(torch.nn.functional.mse_loss, NonFiniteGuard(), validator=validator, network=network)
    with caplog.at_level("INFO"), pytest.raises(NonFiniteTrainingError, match=r"validation after epoch 1 gave a non-finite key metric: ged = nan"):
        trainer.run()
    assert not (tmp_path / "model.pt").exists() and "Got new best metric" not in caplog.text


# ------------------------------------------------------------------------------------------------
# every bundle
# ------------------------------------------------------------------------------------------------
TINY = {
    "cimd": {"unet_channels": [8, 8], "unet_norm_groups": 4, "unet_head_channels": 8, "num_train_timesteps": 20,
             "num_val_samples": 2, "val_inference_steps": 2},
    "ambdiffseg": {"unet_channels": [8, 16], "unet_res_blocks": [1, 1], "unet_norm_groups": 4, "unet_head_channels": 8,
                   "num_inference_steps": 2, "num_val_samples": 2},
    "consensus_diffusion": {"unet_channels": [8, 16], "unet_norm_groups": 4, "unet_head_channels": 4, "rrdb_features": 4,
                            "rrdb_blocks": 1, "rrdb_growth_channels": 2, "val_batch_size": 4, "num_val_generations": 1,
                            "val_inference_steps": 2},
    "prob_unet": {"unet_channels": [8, 16], "num_res_units": 1},
    "phiseg": {"channels": [8, 16, 16], "latent_levels": 2, "convs_per_level": 1},
    "ssn": {"unet_channels": [8, 16], "num_res_units": 1, "num_head_convs": 1},
}


def _bundle(bundle: str, files: list[str], tmp_path: Path, small_demo_dataset: str, **overrides) -> ConfigWorkflow:
    configs = BUNDLES / bundle / "configs"
    settings = {
        "dataset_dir": small_demo_dataset, "demo_dir": None, "output_dir": str(tmp_path / "run"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "batch_size": 4, "amp": False, "max_epochs": 2,
        "val_interval": 1, **TINY[bundle], **overrides,
    }
    workflow = ConfigWorkflow(config_file=[str(configs / f) for f in files], meta_file=str(configs / "metadata.json"),
                              logging_file=str(configs / "logging.conf"), workflow_type=None, run_id="training", **settings)
    workflow.initialize()
    return workflow


def _cause(error: BaseException, kind: type) -> BaseException:
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no {kind.__name__} in the chain"
    return error


def _finite(path: Path) -> bool:
    """Every floating-point tensor in the file (a state dict, or a dict of them) is finite."""

    def tensors(value):
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)

    found = [t for t in tensors(torch.load(path, map_location="cpu", weights_only=False)) if t.is_floating_point()]
    return bool(found) and all(bool(torch.isfinite(t).all()) for t in found)


@pytest.mark.parametrize("bundle", sorted(TINY))
def test_every_bundle_stops_at_a_nan_loss_and_keeps_only_finite_models(bundle, tmp_path, small_demo_dataset):
    workflow = _bundle(bundle, ["train.json"], tmp_path, small_demo_dataset)
    guards = [h for h in workflow.parser.get_parsed_content("train#handlers") if isinstance(h, NonFiniteGuard)]
    assert len(guards) == 1, "train#handlers must hold one NonFiniteGuard"
    trainer = workflow.parser.get_parsed_content("train#trainer")
    loss = trainer.loss_function
    calls = {"n": 0}

    def nan_in_epoch_2(pred, target):  # 8 training cases, batch 4: iteration 3 opens epoch 2
        calls["n"] += 1
        value = loss(pred, target)
        return value * math.nan if calls["n"] == 3 else value

    trainer.loss_function = nan_in_epoch_2
    with pytest.raises(RuntimeError) as caught:  # monai.bundle wraps it: "Failed to evaluate ..."
        workflow.run()
    assert "epoch 2, iteration 3: the loss is nan" in str(_cause(caught.value, NonFiniteTrainingError))
    models = tmp_path / "run" / "models"
    assert _finite(models / "model.pt") and _finite(models / "checkpoint_epoch=1.pt")  # from epoch 1: finite
    assert not (models / "checkpoint_epoch=2.pt").exists()


def test_ddpm_det_seg_with_a_huge_learning_rate_exits_non_zero_and_saves_no_nan_model(tmp_path, small_demo_dataset):
    """The run of the issue: it used to finish with exit code 0, a 'new best' and an all-NaN model.pt."""
    configs = BUNDLES / "cimd" / "configs"
    overrides = {**TINY["cimd"], "batch_size": 4, "amp": False, "max_epochs": 3, "val_interval": 1, "learning_rate": 1000}
    command = [sys.executable, "-m", "monai.bundle", "run", "training",
               "--config_file", str([str(configs / "train.json"), str(configs / "ddpm_det_seg.json")]),
               "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
               "--dataset_dir", small_demo_dataset, "--demo_dir", "None", "--output_dir", str(tmp_path / "run"),
               "--tracking_uri", f"sqlite:///{tmp_path / 'mlruns.db'}"]
    for key, value in overrides.items():
        command += [f"--{key}", str(value).replace(" ", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    link_bundles(tmp_path)  # the bundles read bundles/common relative to the working directory
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "NonFiniteTrainingError: non-finite training step at epoch 1, iteration 2: the loss is inf" in done.stderr
    assert "Got new best metric" not in done.stdout + done.stderr
    models = tmp_path / "run" / "models"
    assert not any(models.glob("*.pt")) if models.is_dir() else True


# ------------------------------------------------------------------------------------------------
# a tracking server that dies mid-run
# ------------------------------------------------------------------------------------------------
MLFLOW_CLI = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
STARTUP_TIMEOUT_S = 300  # the server imports all of MLflow: on a loaded 2-core machine, a minute or more


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """``mlflow server`` on a loopback port, in its own process group (SQLite backend, served artifacts)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, wait: bool = True) -> _Server:
        command = [MLFLOW_CLI, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root}/server.db",
                   "--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                        start_new_session=True)
        return self.wait() if wait else self

    def wait(self) -> _Server:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while tracking.probe_tracking_uri(self.uri, timeout=2) is not None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        if self.process is not None:
            self.log.close()


@pytest.fixture
def server(tmp_path):
    if MLFLOW_CLI is None:
        pytest.skip("the mlflow command-line tool is not installed")
    root = tmp_path / "server"
    root.mkdir()
    server = _Server(root).start()
    yield server
    server.kill()


def _alarm(seconds: int, what: str):
    def fail(signum, frame):
        raise TimeoutError(f"{what} blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    return previous


def test_a_server_killed_mid_run_loses_nothing_and_syncs_back(server, tmp_path, small_demo_dataset, monkeypatch):
    monkeypatch.chdir(tmp_path)
    link_bundles(tmp_path)  # the bundles read bundles/common relative to the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    offline_uri = f"sqlite:///{tmp_path / 'offline.db'}"
    monkeypatch.setenv(tracking.OFFLINE_URI_ENV, offline_uri)
    workflow = _bundle("prob_unet", ["train.json"], tmp_path, small_demo_dataset, tracking_uri=server.uri, max_epochs=3,
                       run_name="killed_mid_run")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    # the server dies after epoch 1 (its training metrics and validation were sent): epochs 2-3 cannot be sent
    def kill_and_restart(engine):
        server.kill()
        server.start(wait=False)  # comes back (same port and store) for the sync below, not for this run

    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), kill_and_restart)
    previous = _alarm(120, "training with a dead tracking server")  # used to block ~4 minutes, then fail
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            workflow.run()
        workflow.finalize()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert trainer.state.epoch == 3
    (warning,) = [w for w in caught if issubclass(w.category, tracking.TrackingServerUnreachableWarning)]
    assert f"MLflow tracking server {server.uri} failed during the run" in str(warning.message)
    assert "(log_batch: connection refused)" in str(warning.message) and "--to " + server.uri in str(warning.message)
    assert server.uri in (tmp_path / "offline.db.pending-sync.txt").read_text()

    offline = mlflow.MlflowClient(offline_uri)
    (run,) = offline.search_runs([offline.get_experiment_by_name("prob_unet").experiment_id])
    assert run.info.run_name == "killed_mid_run" and run.info.status == "FINISHED"
    server_run_id = run.data.tags[tracking.TAG_CONTINUES_RUN]
    assert run.data.params["learning_rate"] and run.data.params["max_epochs"] == "3"  # carried over
    steps = {m.step for m in offline.get_metric_history(run.info.run_id, "ged")}
    assert steps == {2, 3}  # validations after the failure

    # the server is back (same store): the sync command merges the offline part into the server's run
    server.wait()
    (synced,) = sync_runs(offline_uri, server.uri)
    assert synced.copied and synced.destination_run_id == server_run_id
    merged = mlflow.MlflowClient(server.uri).get_run(server_run_id)
    assert merged.info.status == "FINISHED"
    assert {m.step for m in mlflow.MlflowClient(server.uri).get_metric_history(server_run_id, "ged")} == {1, 2, 3}
    (again,) = sync_runs(offline_uri, server.uri)
    assert not again.copied  # nothing copied twice


def test_a_hung_server_costs_seconds_once_then_the_run_goes_on_offline(tmp_path):
    """A server that accepts connections but never answers (e.g. a stopped process)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel completes the handshakes; nothing ever answers
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        client = tracking.FailoverClient(mlflow.MlflowClient(uri), uri, offline_uri=f"sqlite:///{tmp_path / 'off.db'}",
                                         experiment_name="cimd", run_name="hung")
        previous = _alarm(90, "a request to a hung tracking server")  # MLflow's defaults: 8 x 120 s per request
        try:
            with pytest.warns(tracking.TrackingServerUnreachableWarning, match="get_experiment_by_name: timed out"):
                experiment = client.get_experiment_by_name("cimd")  # None: not in the offline store yet
            experiment_id = client.create_experiment("cimd")
            run = client.create_run(experiment_id, run_name="hung")
            client.log_metric(run.info.run_id, "loss", 0.5, step=1)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    assert experiment is None and client.offline
    offline = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'off.db'}")
    assert offline.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
    assert (tmp_path / "off.db.pending-sync.txt").read_text().strip().endswith(f"--to {uri}")


def test_outages_are_told_apart_from_bad_requests():
    from mlflow.exceptions import MlflowException, RestException

    assert tracking.is_tracking_outage(MlflowException("API request to http://x/api failed with exception Max retries exceeded"))
    assert tracking.is_tracking_outage(MlflowException("API request to endpoint /api failed with error code 503 != 200."))
    assert tracking.is_tracking_outage(RestException({"error_code": "INTERNAL_ERROR", "message": "db down"}))
    assert not tracking.is_tracking_outage(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))
    assert not tracking.is_tracking_outage(MlflowException("Invalid metric name"))
    assert not tracking.is_tracking_outage(ValueError("bad"))


def test_http_limits_apply_only_inside_the_block_and_never_override_the_user(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    with tracking.bounded_http_requests():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"
