"""A bundle run with a wrong input ends with one short message naming the file or setting and the fix,
not MONAI's chained ``RuntimeError: Failed to evaluate ConfigExpression`` traceback; ``AMBISEG_DEBUG=1``
brings the traceback back. Called from Python, the helpers raise ordinary exceptions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ambiseg_monai.bundle import (
    BundleInputError,
    DatasetNotPreparedError,
    InferenceInputError,
    inference_items,
    prepare_dataset,
)
from ambiseg_monai.bundle.dataset import prepare_command
from ambiseg_monai.data.datalist import DatalistError

REPO = Path(__file__).resolve().parents[1]
CIMD = "bundles/cimd/configs"


def _bundle_run(run_id: str, configs: list[str], *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` from the repository root, as the docs show it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("AMBISEG_DEBUG", None)
    if debug:
        env["AMBISEG_DEBUG"] = "1"
    config_file = "[" + ",".join(f"'{CIMD}/{name}'" for name in configs) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _error_lines(stderr: str) -> list[str]:
    """stderr without the warnings other parts of the stack print (not this feature's concern)."""
    lines, skip_next = [], False
    for line in stderr.splitlines():
        if skip_next:  # the source line Python's warnings module prints under a warning
            skip_next = False
            continue
        if "Warning:" in line:
            skip_next = True
            continue
        if line.strip():
            lines.append(line)
    return lines


def _outputs(tmp_path: Path) -> list[str]:
    """Keep outputs and the MLflow store out of the repository."""
    return ["--output_dir", str(tmp_path / "runs"), "--tracking_uri", f"sqlite:///{tmp_path / 'mlruns.db'}"]


def test_training_on_a_dataset_not_prepared_says_how_to_prepare_it(tmp_path):
    missing = tmp_path / "lidc"
    result = _bundle_run("training", ["train.json", "lidc.json"], "--dataset_dir", str(missing), *_outputs(tmp_path))
    lines = _error_lines(result.stderr)
    assert result.returncode != 0
    assert len(lines) < 5, result.stderr
    message = "\n".join(lines)
    assert f"{missing / 'datalist.json'}: no datalist found" in message
    assert f"ambiseg prepare lidc --source <LIDC-IDRI download folder> --out {missing}" in message
    assert "Traceback" not in result.stderr and "RuntimeError" not in result.stderr
    assert "AMBISEG_DEBUG=1" in message
    assert not missing.exists()


def test_inference_with_a_wrong_input_dir_names_the_setting(tmp_path, small_demo_dataset):
    missing = tmp_path / "nonexistent"
    result = _bundle_run(
        "inferring",
        ["train.json", "inference.json"],
        "--dataset_dir",
        small_demo_dataset,
        "--input_dir",
        str(missing),
        *_outputs(tmp_path),
    )
    lines = _error_lines(result.stderr)
    assert result.returncode != 0
    assert len(lines) < 5, result.stderr
    message = "\n".join(lines)
    assert f"inference input '{missing}' (input_dir)" in message and "does not exist" in message
    assert "--input_dir" in message
    assert "Traceback" not in result.stderr


def test_a_switch_given_a_wrong_value_names_the_setting(tmp_path, small_demo_dataset):
    """``--amp maybe``: the switch's name and its values, not a run with mixed precision left on."""
    result = _bundle_run(
        "training", ["train.json"], "--dataset_dir", small_demo_dataset, "--amp", "maybe", *_outputs(tmp_path)
    )
    lines = _error_lines(result.stderr)
    assert result.returncode != 0
    assert len(lines) < 5, result.stderr
    message = "\n".join(lines)
    assert "setting 'amp' is a switch: give true or false" in message and "got 'maybe'" in message
    assert "Traceback" not in result.stderr and "RuntimeError" not in result.stderr
    assert not (tmp_path / "runs" / "models").exists()  # nothing trained


def test_ambiseg_debug_brings_the_traceback_back(tmp_path):
    missing = tmp_path / "lidc"
    result = _bundle_run(
        "training", ["train.json", "lidc.json"], "--dataset_dir", str(missing), *_outputs(tmp_path), debug=True
    )
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "DatasetNotPreparedError" in result.stderr and "ambiseg prepare lidc" in result.stderr


def test_python_callers_get_ordinary_exceptions(tmp_path):
    with pytest.raises(DatasetNotPreparedError, match="no datalist found") as raised:
        prepare_dataset(tmp_path / "qubiq_prostate2", image_channels=1, demo_dir=None)
    assert isinstance(raised.value, DatalistError) and isinstance(raised.value, ValueError)
    assert "ambiseg prepare qubiq --source <QUBIQ data folder> --task prostate --subtask 2" in str(raised.value)
    with pytest.raises(InferenceInputError) as raised:
        inference_items(tmp_path / "missing")
    assert isinstance(raised.value, FileNotFoundError) and isinstance(raised.value, BundleInputError)


@pytest.mark.parametrize(
    ("folder", "command"),
    [
        ("data/lidc", "ambiseg prepare lidc --source <LIDC-IDRI download folder> --out data/lidc"),
        ("data/lidc_pickle", "ambiseg prepare lidc-pickle --source <data_lidc.pickle> --out data/lidc_pickle"),
        ("data/ms_isbi2015", "ambiseg prepare ms-isbi2015 --source <ISBI 2015 folder> --out data/ms_isbi2015"),
        (
            "data/qubiq_brain_growth",
            "ambiseg prepare qubiq --source <QUBIQ data folder> --task brain-growth --out data/qubiq_brain_growth",
        ),
        ("data/bone_us", "ambiseg prepare folder --csv <cases.csv> --out data/bone_us --name bone_us --modality US"),
        ("data/demo2", "ambiseg prepare demo --out data/demo2"),
        ("data/mine", "ambiseg prepare <importer> ... --out data/mine"),
    ],
)
def test_prepare_command_follows_the_overlays_folder_names(folder, command):
    assert prepare_command(folder) == command
