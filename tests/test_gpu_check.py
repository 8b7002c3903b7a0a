"""benchmarks/gpu_check.py: the GPU command runs on a CPU with --tiny, prints every table, and survives a
failing or over-budget section."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
# the deploy extra's Holoscan warns on `import monai` in an environment that has it (not the script's doing)
HOLOSCAN_STACK_WARNING = re.compile(r"Current stack size|^\s*warnings\.warn\($")


def _number(cell: str) -> float:
    return float(cell.strip())


def test_tiny_run_on_cpu_prints_every_table(tmp_path):
    out, report = tmp_path / "report.md", tmp_path / "report.json"
    # generous budgets: this test is about the content (a loaded CI machine must not cut sections short)
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
               "--threads", "1", "--out", str(out), "--json", str(report),
               "--budget", "training=900", "sampling=900", "torchscript=900"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    stdout = done.stdout
    assert out.read_text() == stdout  # --out holds the printed report
    noise = [line for line in (stdout + done.stderr).splitlines() if re.search("warn", line, re.I)]
    assert not [line for line in noise if not HOLOSCAN_STACK_WARNING.search(line)], noise
    assert "device: CPU" in stdout and "torch " in stdout and "date: " in stdout
    assert "## Training throughput (--tiny: tiny networks, 32 x 32)" in stdout

    result = json.loads(report.read_text())
    assert result["settings"] == "tiny (CPU check)" and result["gpus"] == 0
    sections = result["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {
        "training": "ok", "sampling": "ok", "torchscript": "ok", "ddp": "skipped"}  # fmt: skip

    # training: every method, fp32 and channels-last measured; the AMP rows say why they are not on a CPU
    lines = stdout.splitlines()
    for method in gpu_check.METHODS:
        rows = [line.split("|")[1:-1] for line in lines if line.startswith(f"| {method} | 32 x 32 | ")]
        rows = [cells for cells in rows if len(cells) == len(gpu_check.HEADERS["training"][1])]  # training table
        measured = {cells[4].strip(): _number(cells[5]) for cells in rows if cells[5].strip() != "-"}
        assert set(measured) >= {"fp32", "fp32 + CL"} and min(measured.values()) > 0, (method, rows)
        assert any("not measured: AMP needs CUDA" in cells[-1] for cells in rows)
    assert all(r["it_s"] > 0 for r in sections["training"]["rows"] if "it_s" in r)

    # sampling: masks/s with the ratio column; CIMD's fast setting against the official loop
    assert "| method | image | setting | masks/s | ratio |" in stdout
    sampling = {(r["method"], r["setting"].split(" ")[0]): r for r in sections["sampling"]["rows"]}
    assert {m for m, _ in sampling} == set(gpu_check.METHODS)
    assert all(r["masks_s"] > 0 for r in sampling.values())
    assert sampling[("cimd", "official")]["ratio"] == "1.0x"
    assert "x vs official" in sampling[("cimd", "fast")]["ratio"]

    # TorchScript: the exported model's row next to the eager network's
    script = [r for r in sections["torchscript"]["rows"] if r["model"] == "TorchScript"]
    assert {r["method"] for r in script} == set(gpu_check.TORCHSCRIPT_METHODS)
    assert all(r["ms_per_call"] > 0 and r["masks_s"] > 0 and r["max_abs_diff"] <= 1e-4 for r in script)
    assert re.search(r"^\| cimd \| 32 x 32 \| TorchScript \| network call \(4 rows\) \| [0-9.]+ \|", stdout, re.M)

    # DDP: skipped with the reason
    assert "SKIPPED ddp: no CUDA device (0 GPUs; it needs 2)" in stdout


def test_a_failing_section_and_a_spent_budget_leave_the_others_running(monkeypatch, capsys):
    def broken(section, settings, budget):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "run_sampling", broken)
    result = gpu_check.main(["--tiny", "--device", "cpu", "--methods", "ssn", "--sections", "training", "sampling",
                             "ddp", "--budget", "training=0"])  # fmt: skip
    sections = result["sections"]
    assert sections["training"]["status"] == "over budget"
    assert sections["training"]["not_measured"] == ["ssn fp32", "ssn fp32 + CL"]
    assert sections["sampling"]["status"] == "error" and "out of memory (simulated)" in sections["sampling"]["reason"]
    assert sections["ddp"]["status"] == "skipped"
    out = capsys.readouterr().out
    assert "TIME BUDGET of training spent; not measured: ssn fp32, ssn fp32 + CL" in out
    assert "ERROR in sampling (the other sections ran): RuntimeError: out of memory (simulated)" in out
    assert "SKIPPED ddp:" in out


def test_a_section_is_stopped_inside_an_item_when_its_budget_runs_out(monkeypatch):
    settings = gpu_check.make_settings(gpu_check._parse(["--tiny", "--budget", "sampling=0.2"]))
    monkeypatch.setattr(gpu_check, "HARD_LIMIT_GRACE_S", 0.0)

    row = {"method": "cimd", "image": "32 x 32", "setting": "official loop", "masks_s": 1.0, "ratio": "1.0x"}

    def slow(section, budget):
        assert budget.allows("the official loop")
        section.rows.append(row)
        time.sleep(30)
        section.rows.append({**row, "setting": "paper"})

    # pytest-timeout holds SIGALRM during the test: lend it to the section's timer, then give it back
    handler, (remaining, _) = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    start = time.perf_counter()
    try:
        section = gpu_check.run_section("sampling", settings, slow)
    finally:
        signal.signal(signal.SIGALRM, handler)
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, max(remaining - (time.perf_counter() - start), 1.0))
    assert time.perf_counter() - start < 5
    assert section.status == "over budget" and section.rows == [row]  # the rows measured before are kept
    printed = "\n".join(gpu_check.section_lines(section))
    assert "| cimd | 32 x 32 | official loop | 1 | 1.0x |" in printed
    assert "TIME BUDGET of sampling spent; not measured: the official loop (stopped when the budget ran out)" in printed


@pytest.mark.parametrize("bad", ["training", "training=", "gpu=10"])
def test_bad_budget_is_named(bad):
    with pytest.raises(SystemExit, match="SECTION=SECONDS"):
        gpu_check.make_settings(gpu_check._parse(["--tiny", "--budget", bad]))
