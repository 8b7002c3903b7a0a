"""The README's promise: two set-up commands, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_two_one_line_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    main_job, tests = commands
    assert "pip install torch==2.13.0" in main_job and "pip install torch==2.13.0" in tests
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = _setup_commands()[1]
    install_and_test = test_command.split(". .venv/bin/activate && ", 1)[1]
    assert install_and_test in ci_script


def test_test_extra_keeps_the_deploy_sdk_out_and_ci_runs_the_deploy_tests():
    """Installed, the deploy SDK makes `import monai` import Holoscan (a warning in every command): it is
    only in the deploy extra, and CI runs the deploy_sdk tests in a second environment that has it."""
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    test_extra = setup.split("TEST_REQUIRES = [", 1)[1].split("]", 1)[0]
    assert "monai-deploy-app-sdk" not in test_extra and "holoscan" not in test_extra
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install torch==2.13.0 -e ".[test,deploy,cpu-engines]" && python -m pytest -q -m deploy_sdk' in ci_script


def test_import_monai_does_not_import_holoscan():
    code = "import sys, monai, ambiseg_monai.handlers; print('holoscan' in sys.modules, 'monai.deploy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    if "True" in result.stdout:
        pytest.skip("the deploy extra is installed in this environment (the deploy environment of .ci/run)")
    assert result.stdout.split() == ["False", "False"]
    assert "Warning" not in result.stderr, result.stderr


def test_ci_runs_the_cpu_engine_tests_with_their_extra():
    """The engine tests skip without the optional cpu-engines extra; CI installs it and runs them (the deploy
    app's engine tests in the deploy environment too)."""
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert (
        'pip install --quiet torch==2.13.0 -e ".[cpu-engines]" && python -m pytest -q tests/test_cpu_engine.py'
        " tests/test_deploy_engine.py" in ci_script
    )
