"""The ambiseg command: prepare demo, refusal to overwrite, usage errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ambiseg_monai.cli import main
from ambiseg_monai.data.datalist import load_datalist

SMALL = ["--image-size", "16", "--num-training", "3", "--num-validation", "1", "--num-test", "1"]


def test_prepare_demo_then_refuse_then_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["prepare", "demo", "--out", str(out), *SMALL]) == 0
    assert "training: 3, validation: 1, test: 1" in capsys.readouterr().out
    assert len(load_datalist(out)["training"]) == 3
    assert main(["prepare", "demo", "--out", str(out), *SMALL, "--num-training", "2"]) == 1
    error = capsys.readouterr().err
    assert "already holds a dataset" in error and "--overwrite" in error and "Traceback" not in error
    assert len(load_datalist(out)["training"]) == 3  # untouched
    assert main(["prepare", "demo", "--out", str(out), *SMALL, "--num-training", "2", "--overwrite"]) == 0
    assert len(load_datalist(out)["training"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "demo"], "the following arguments are required: --out"),
        (["prepare", "demo", "--out", "x", "--num-raters", "0"], "must be a positive integer"),
        (["prepare", "demo", "--out", "x", "--image-size", "big"], "invalid _positive_int value"),
        (["prepare"], "required: DATASET"),
        (["prepare", "nosuch"], "invalid choice: 'nosuch'"),
    ],
)
def test_bad_arguments_give_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: ambiseg" in error and message in error


def test_invalid_value_reported_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ambiseg_monai.cli", "prepare", "demo", "--out", str(tmp_path / "d"),
         "--image-size", "8"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    assert "ambiseg: error: image_size must be at least 16" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()


def test_prepare_demo_does_not_import_torch(tmp_path):
    """Only the chosen subcommand's module is imported: dataset preparation stays light."""
    code = (
        "import sys; from ambiseg_monai.cli import main; "
        f"assert main(['prepare', 'demo', '--out', {str(tmp_path / 'd')!r}, '--image-size', '16', "
        "'--num-training', '1', '--num-validation', '0', '--num-test', '0']) == 0; "
        "print(sorted(m for m in ('torch', 'monai', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_sync_copies_offline_runs_into_another_store(tmp_path, capsys):
    import mlflow

    source, destination = f"sqlite:///{tmp_path / 'offline.db'}", f"sqlite:///{tmp_path / 'server.db'}"
    mlflow.set_tracking_uri(source)
    try:
        mlflow.set_experiment("cimd")
        with mlflow.start_run(run_name="offline_part"):
            mlflow.log_metric("ged", 0.5, step=1)
    finally:
        mlflow.set_tracking_uri(None)
    assert main(["sync", "--from", source, "--to", destination]) == 0
    assert "cimd: 1 run(s) copied" in capsys.readouterr().out
    runs = mlflow.MlflowClient(destination).search_runs([mlflow.MlflowClient(destination).get_experiment_by_name("cimd").experiment_id])
    assert [run.data.metrics["ged"] for run in runs] == [0.5]
    assert main(["sync", "--from", source, "--to", destination]) == 0  # nothing new the second time
    assert "0 run(s) copied" in capsys.readouterr().out


HELP_COMMANDS = [
    *(["prepare", name] for name in ("demo", "lidc", "lidc-pickle", "folder", "ms-isbi2015", "qubiq")),
    *([name] for name in ("compare", "export", "merge-configs", "sync")),
]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_help_pages_are_plain_text(command, capsys):
    """The --help pages show the modules' docstrings without their Sphinx markup (issue #18)."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    page = capsys.readouterr().out
    assert page.startswith(f"usage: ambiseg {' '.join(command)}")
    for markup in (":func:", ":class:", ":mod:", ":meth:", "``"):
        assert markup not in page, f"ambiseg {' '.join(command)} --help shows {markup}"
    assert not [line for line in page.splitlines() if line.rstrip().endswith("::")]


def test_plain_text_strips_roles_and_literals():
    from ambiseg_monai.cli import plain_text

    text = "Written by :func:`~a.b.write` into :class:`a.B` (:mod:`the module <a.c>`), ``x + 1``.\n\nUsage::\n"
    assert plain_text(text) == "Written by write into a.B (the module), x + 1.\n\nUsage:"


def test_export_help_names_the_checkpoint_the_training_writes(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    page = capsys.readouterr().out
    assert "runs/cimd/models/model.pt" in page and "runs/cimd/model.pt" not in page
