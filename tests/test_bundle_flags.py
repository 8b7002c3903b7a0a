"""Switches given on the bundle command line: ``python -m monai.bundle run ... --amp false`` delivers the
*string* ``"false"`` (python-fire turns only ``False`` / ``True`` into bools), which a config's ``$``
expression takes as true. The configs read every switch through ``ambiseg_monai.bundle.as_flag``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _bundle_runner import SMALL_SETTINGS
from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser, ConfigWorkflow

import ambiseg_monai.utils.device as device_utils
from ambiseg_monai.bundle import BundleInputError, as_flag

REPO = Path(__file__).resolve().parents[1]
CIMD = REPO / "bundles" / "cimd" / "configs"
#: top-level true/false values that are not settings: computed per rank (multi_gpu_train.json)
NOT_SWITCHES = {"is_not_rank0"}


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True), (False, False), (1, True), (0, False),
        ("true", True), ("false", False), ("True", True), ("FALSE", False), (" false ", False),
        ("yes", True), ("No", False), ("on", True), ("OFF", False), ("1", True), ("0", False),
    ],
)  # fmt: skip
def test_as_flag_reads_switch_values(value, expected):
    assert as_flag(value, "amp") is expected


@pytest.mark.parametrize("value", ["maybe", "", "tru", "2", 2, -1, 0.0, 1.0, None, [True], "none"])
def test_as_flag_rejects_other_values_naming_the_setting(value):
    with pytest.raises(ValueError) as raised:
        as_flag(value, "amp")
    assert isinstance(raised.value, BundleInputError)
    message = str(raised.value)
    assert "'amp'" in message and "true or false" in message and repr(value) in message
    assert "\n" not in message and len(message) < 160


def test_the_command_line_delivers_lower_case_switches_as_strings():
    """What ``python -m monai.bundle`` (``fire.Fire``) makes of the values: the reason for ``as_flag``."""
    assert DefaultParseValue("false") == "false" and DefaultParseValue("False") is False
    assert DefaultParseValue("0") == 0 and DefaultParseValue("no") == "no"


def _switches() -> dict[str, list[str]]:
    """Every bundle's switches (top-level settings with a true/false value) -> the config files setting them."""
    found: dict[str, list[str]] = {}
    for path in sorted(REPO.glob("bundles/*/configs/*.json")):
        config = json.loads(path.read_text(encoding="utf-8"))
        for key, value in config.items() if isinstance(config, dict) else ():
            if isinstance(value, bool) and key not in NOT_SWITCHES:
                found.setdefault(key, []).append(str(path.relative_to(REPO)))
    return found


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_every_switch_of_every_bundle_is_read_through_as_flag():
    switches = _switches()
    assert {"amp", "resume", "log_every_iteration", "log_mlflow_model", "rater_posterior_targets"} <= set(switches)
    uses: dict[str, int] = dict.fromkeys(switches, 0)
    direct: list[str] = []
    for path in sorted(REPO.glob("bundles/*/configs/*.json")):
        for text in _strings(json.loads(path.read_text(encoding="utf-8"))):
            for key in switches:
                refs = len(re.findall(rf"@{key}(?![\w#:])", text))
                through = text.count(f"ambiseg_monai.bundle.as_flag(@{key}, '{key}')")
                uses[key] += refs
                if refs != through or (through and not text.startswith("$")):
                    direct.append(f"{path.relative_to(REPO)}: {text}")
    assert not direct, "switches read without ambiseg_monai.bundle.as_flag:\n" + "\n".join(direct)
    assert all(uses.values()), f"switches no config reads: {[k for k, n in uses.items() if not n]}"


def _cimd_parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CIMD / "train.json"))
    parser.update(overrides)
    parser.parse()
    return parser


def test_string_switches_from_the_command_line_switch_off(monkeypatch):
    monkeypatch.setattr(device_utils, "cpu_has_native_bf16", lambda: True)  # a CPU where amp means bf16
    overrides = {key: DefaultParseValue("false") for key in ("amp", "rater_posterior_targets", "log_every_iteration")}
    off = _cimd_parser(**overrides, resume="no", log_mlflow_model="0")
    assert off.get_parsed_content("mixed_precision") is None
    assert off.get_parsed_content("train#prepare_batch#rater_key") is None
    assert off.get_parsed_content("train#inferer#rater_posterior_targets") is False
    assert off.get_parsed_content("train#handlers#0#resume") is False
    assert off.get_parsed_content("train#handlers#6#iteration_log") is False
    assert off.get_parsed_content("train#handlers#7#enabled") is False
    on = _cimd_parser(amp="TRUE", rater_posterior_targets="true")
    assert on.get_parsed_content("mixed_precision") == "bfloat16"
    assert on.get_parsed_content("train#prepare_batch#rater_key") == "label"


def test_a_wrong_switch_value_fails_naming_the_setting():
    parser = _cimd_parser(amp="maybe")
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps an expression's error
        parser.get_parsed_content("mixed_precision")
    cause = raised.value.__cause__
    assert isinstance(cause, BundleInputError) and "'amp'" in str(cause) and "'maybe'" in str(cause)


def test_training_with_amp_false_given_as_a_string_runs_without_autocast(small_demo_dataset, tmp_path, monkeypatch):
    """A tiny CIMD training run with the overrides as the command line delivers them: no autocast anywhere."""
    monkeypatch.setattr(device_utils, "cpu_has_native_bf16", lambda: True)  # amp on would autocast in bf16
    settings = {
        **SMALL_SETTINGS["cimd"], "max_epochs": 1, "iterations_per_epoch": 2, "val_interval": 1,
        "dataset_dir": small_demo_dataset, "demo_dir": None, "output_dir": str(tmp_path / "run"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "amp": "false", "log_mlflow_model": "false", "log_every_iteration": "false",
    }  # fmt: skip
    workflow = ConfigWorkflow(config_file=str(CIMD / "train.json"), workflow_type=None, run_id="training", **settings)
    workflow.initialize()
    autocast: list[bool] = []
    network = workflow.parser.get_parsed_content("network")
    network.register_forward_pre_hook(lambda module, args: autocast.append(torch.is_autocast_enabled("cpu")))
    workflow.run()
    workflow.finalize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 and len(autocast) >= 2
    assert not any(autocast), "the network ran under autocast"
    assert trainer.amp is False and workflow.parser.get_parsed_content("validate#evaluator").amp is False
    assert workflow.parser.get_parsed_content("train#inferer").autocast_dtype is None
    import mlflow

    client = mlflow.MlflowClient(settings["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("cimd").experiment_id])
    assert run.data.params["amp"] == "false"  # the value as given
    assert client.search_logged_models([run.info.experiment_id]) == []  # log_mlflow_model "false": no model
