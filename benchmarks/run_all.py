"""Run the benchmark suite and collect every script's printout into one Markdown report.

Each benchmark stays its own script (one concern each); this runs them one after the other as
subprocesses with reduced CPU settings (about an hour on 2 CPU cores), or the full-size GPU
settings with ``--full``, and writes a report with the date, the device and the command of each run.

    python benchmarks/run_all.py --out benchmark_report.md            # reduced CPU settings
    python benchmarks/run_all.py --full --out benchmark_report.md     # GPU sizes
    python benchmarks/run_all.py --only sampling_methods training     # a subset
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# script -> (arguments of the reduced CPU run, arguments of the full-size GPU run)
SUITE = {
    "sampling": (["--image-size", "64", "--images", "2", "--threads", "1"],
                 ["--image-size", "128", "--steps", "25", "--images", "4"]),
    "sampling_methods": (["--image-size", "64", "--timed-steps", "5", "--repeats", "2", "--threads", "1",
                          "--flow-steps", "5"],
                         ["--timed-steps", "1000", "--flow-steps", "5"]),
    "sampler_overhead": (["--image-size", "64", "--repeats", "3", "--threads", "1"], ["--repeats", "10"]),
    "training": (["--epochs", "3", "--threads", "1"], ["--image-size", "128", "--epochs", "5"]),
    "metrics": ([], []),
    "preprocessing": ([], ["--image-size", "512", "512", "--padding-slices", "60"]),
    "convergence": (["--iterations", "250", "1000", "--samples", "32", "--threads", "1"],
                    ["--iterations", "250", "500", "1000", "2000", "4000", "8000", "--samples", "64",
                     "--final-samples", "200"]),
    "hardware_limit": (["--image-size", "64", "--repeats", "2", "--threads", "1"],
                       ["--image-size", "128", "--threads", "1"]),
    "cost_curves": (["--repeats", "1", "--threads", "1", "--out-dir", "benchmark_curves"],
                    ["--repeats", "2", "--threads", "1", "--out-dir", "benchmark_curves"]),
    # the GPU check: tiny sizes on a CPU (about a minute), the paper's sizes on a GPU (about 8 minutes)
    "gpu_check": (["--tiny"], []),
}

def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    parser.add_argument("--full", action="store_true", help="full-size settings (GPU)")
    parser.add_argument("--out", default="benchmark_report.md")
    return parser.parse_args()


def device_name() -> str:
    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available)"


def main() -> None:
    args = _parse()
    sections = [
        "# Benchmark report",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {device_name()}; "
        f"torch {torch.__version__}; settings: {'full (GPU)' if args.full else 'reduced (CPU)'}",
    ]
    for name in args.only:
        command = [sys.executable, str(HERE / f"{name}.py"), *SUITE[name][1 if args.full else 0]]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        shown = " ".join(["python", f"benchmarks/{name}.py", *command[2:]])
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        status = "" if done.returncode == 0 else f" (FAILED, exit {done.returncode}: {done.stderr.strip()[-500:]})"
        sections += [f"## {name}{status}", f"`{shown}` ({elapsed:.0f} s)", "", *lines, ""]
        print(f"{name}: {elapsed:.0f} s{status}", flush=True)
    Path(args.out).write_text("\n".join(sections) + "\n")
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
