"""One command for a lent GPU (about 8 minutes): AMP training, sampling, TorchScript and DDP, with the device name.

    python benchmarks/gpu_check.py --out gpu_check.md --json gpu_check.json    # GPU: paper sizes, ~8 min
    python benchmarks/gpu_check.py --tiny                                       # CPU: tiny sizes, ~1 min (CI)

Four sections, each guarded (an error is printed with its traceback's last line and the next section
runs) and each with a time budget (``--budget SECTION=SECONDS``; when it is spent the section stops and
says which items it did not measure):

1. ``training``: iterations/s and peak memory (``torch.cuda.max_memory_allocated``) of every method's own
   ``SupervisedTrainer`` (built from ``bundles/<method>/configs/train.json`` as ``benchmarks/training.py``
   does, no handlers) with the paper's network and batch (the bundle's paper overlay: ``lidc.json``, for
   consensus diffusion ``qubiq_kidney.json``) at the paper's image size (LIDC 128 x 128, QUBIQ kidney
   256 x 256) on the demo dataset: fp32, then fp16 and bf16 AMP (MONAI's ``amp`` with ``amp_kwargs``
   dtype) with channels-last weights. MONAI's engines autocast on CUDA only, so on a CPU the AMP rows
   say so and fp32 with channels-last is measured instead.
2. ``sampling``: masks/s of N masks of one image at the paper and the fast settings against the
   re-created official CIMD loop (``benchmarks/sampling_methods.py``: the N masks batched into one
   network call on a GPU; long chains timed on a prefix and extrapolated).
3. ``torchscript``: the model exported as ``ambiseg export`` writes it (``ambiseg_monai.deploy.export``:
   traced, verified against the eager network) against the eager network: one network call on N rows
   and the fast sampler's masks/s (CIMD) or one N-sample prior draw (Prob. U-Net), float32 both.
4. ``ddp``: ``multi_gpu_train.json`` of CIMD (paper network) in 2 processes under torchrun with NCCL,
   one epoch with validation, when at least 2 GPUs are present; otherwise skipped with the reason.

``--tiny``: 32 x 32 images, tiny networks, a few iterations and steps: the same tables on a CPU in about
a minute (tested in CI by ``tests/test_gpu_check.py``). Output: Markdown to stdout, ``--out`` writes it
to a file too, ``--json`` writes every row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ambiseg_monai.bundle.config import working_directory
from ambiseg_monai.data.demo import ensure_demo_dataset

try:
    from benchmarks import sampling_methods, training
    from benchmarks._common import format_table
    from benchmarks.timing import best_seconds
except ImportError:  # run as a script: this folder is sys.path[0]
    import sampling_methods
    import training
    from _common import format_table
    from timing import best_seconds

REPO = Path(__file__).resolve().parents[1]
METHODS = ("cimd", "ambdiffseg", "consensus_diffusion", "prob_unet", "phiseg", "ssn")
# method -> (paper overlay of its bundle, the paper's image size)
PAPER = {
    "cimd": ("lidc.json", 128),
    "ambdiffseg": ("lidc.json", 128),
    "consensus_diffusion": ("qubiq_kidney.json", 256),
    "prob_unet": ("lidc.json", 128),
    "phiseg": ("lidc.json", 128),
    "ssn": ("lidc.json", 128),
}
TINY_SIZE = 32
# --tiny: the overlays' networks made tiny through the bundles' own top-level keys (list-valued keys of
# the overlays replaced by lists of the tiny depth)
TINY_NETWORKS: dict[str, dict[str, Any]] = {
    "cimd": {"unet_channels": [8, 8], "unet_attention_levels": [False, True], "unet_norm_groups": 4,
             "unet_head_channels": 8},
    "ambdiffseg": {"unet_channels": [8, 16], "unet_res_blocks": [1, 1], "unet_attention_levels": [False, True],
                   "unet_norm_groups": 4, "unet_head_channels": 8, "center_crop_size": [TINY_SIZE, TINY_SIZE]},
    "consensus_diffusion": {"unet_channels": [8, 8], "unet_res_blocks": 1, "unet_attention_levels": [False, True],
                            "unet_norm_groups": 4, "unet_head_channels": 4, "rrdb_features": 4, "rrdb_blocks": 1,
                            "rrdb_growth_channels": 2, "image_size": [TINY_SIZE, TINY_SIZE]},
    "prob_unet": {"unet_channels": [8, 16], "num_res_units": 1},
    "phiseg": {"channels": [8, 16, 16], "latent_levels": 2, "convs_per_level": 1},
    "ssn": {"unet_channels": [8, 16], "num_res_units": 1, "num_head_convs": 1},
}  # fmt: skip
SECTIONS = ("training", "sampling", "torchscript", "ddp")
# seconds per section on a GPU (together 7 minutes; imports, the demo dataset and the report take the rest of 8)
GPU_BUDGETS = {"training": 160.0, "sampling": 140.0, "torchscript": 50.0, "ddp": 70.0}
# --tiny takes about a minute on an idle CPU; the budgets leave room for a loaded one
TINY_BUDGETS = {"training": 240.0, "sampling": 240.0, "torchscript": 120.0, "ddp": 60.0}
HARD_LIMIT_GRACE_S = 5.0  # a section is stopped inside an item this long after its budget
TORCHSCRIPT_METHODS = ("cimd", "prob_unet")  # one traced denoiser, one traced latent prior sampler


@dataclass
class Settings:
    """Sizes of one run: the paper's (GPU) or tiny ones (CPU, CI)."""

    tiny: bool
    device: torch.device
    methods: tuple[str, ...]
    num_samples: int  # N masks per image
    warmup_iterations: int  # training: the first epoch (not timed)
    timed_epochs: int  # training: epochs of ``warmup_iterations`` iterations timed after the first
    timed_steps: int  # sampling: steps timed per long chain (then extrapolated)
    repeats: int  # timed runs per sampling setting (best is kept)
    workers: int  # training data loader processes
    budgets: dict[str, float] = field(default_factory=dict)

    def image_size(self, method: str) -> int:
        return TINY_SIZE if self.tiny else PAPER[method][1]

    def overlays(self, method: str) -> tuple[str, ...]:
        return (PAPER[method][0],)

    def overrides(self, method: str) -> dict[str, Any]:
        """Config values on top of the paper overlay: the tiny networks and batch (``--tiny``)."""
        return {**TINY_NETWORKS[method], "batch_size": 2} if self.tiny else {}


@dataclass
class Section:
    """One section's result: its rows (dicts, in table order), a status and what was not measured."""

    name: str
    title: str
    header: tuple[str, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"  # ok | skipped | error | over budget
    reason: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)


class SectionTimeout(BaseException):
    """Raised in the main thread when a section's time budget is spent (not an ``Exception``: library code
    that catches errors does not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (POSIX interval timer; elsewhere,
    or off the main thread, no hard limit: the sections still stop between items)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    usable = usable and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)  # e.g. not under pytest-timeout
    if not usable:
        yield
        return

    def expire(signum, frame) -> None:
        raise SectionTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """The soft side of a section's time budget: items start only while time is left."""

    def __init__(self, section: Section, seconds: float) -> None:
        self.section, self.seconds, self.start = section, seconds, time.perf_counter()
        self.current = ""  # the item that was started last

    def allows(self, item: str) -> bool:
        """True if ``item`` may start; otherwise it is recorded as not measured."""
        if time.perf_counter() - self.start < self.seconds:
            self.current = item
            return True
        self.section.not_measured.append(item)
        return False


# ------------------------------------------------------------------------------------------ environment


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what :mod:`platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> dict[str, Any]:
    """Device name (``torch.cuda.get_device_name``), GPU count, torch / CUDA / cuDNN versions, host, date."""
    info: dict[str, Any] = {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), memory_gib=round(properties.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())  # fmt: skip
    else:
        info["device"] = f"CPU ({info['cpu']})"
    return info


# --------------------------------------------------------------------------------------------- training


def training_settings(device: torch.device) -> list[tuple[str, torch.dtype | None, bool, str]]:
    """(name, AMP dtype or None for fp32, channels-last, why not measured here or "")."""
    if device.type == "cuda":
        bf16 = "" if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
        return [("fp32", None, False, ""), ("fp16 AMP + CL", torch.float16, True, ""),
                ("bf16 AMP + CL", torch.bfloat16, True, bf16)]  # fmt: skip
    why = "AMP needs CUDA (MONAI's engines autocast on CUDA only)"
    return [("fp32", None, False, ""), ("fp32 + CL", None, True, ""),
            ("fp16 AMP + CL", torch.float16, True, why), ("bf16 AMP + CL", torch.bfloat16, True, why)]  # fmt: skip


def measure_training(
    method: str, settings: Settings, dataset_dir: str, output_dir: str, amp: torch.dtype | None, channels_last: bool
) -> dict[str, Any]:
    """One method's trainer at one precision / memory format: it/s, images/s, peak MiB, parameters."""
    device = settings.device
    iterations = settings.warmup_iterations
    overrides = {**settings.overrides(method), "iterations_per_epoch": iterations, "num_workers": settings.workers,
                 "demo_dir": None,  # a prepared dataset: no comparison with the default demo
                 "val_interval": 10**6, "device": f"$torch.device('{device}')"}  # fmt: skip
    torch.manual_seed(0)
    parser = training.trainer_parser(method, dataset_dir, output_dir, 1 + settings.timed_epochs, amp is not None,
                                     settings.overlays(method), overrides)  # fmt: skip
    if amp is not None:
        parser["train#trainer#amp_kwargs"] = {"dtype": f"$torch.{str(amp).removeprefix('torch.')}"}
    if settings.workers:
        parser["train#dataloader#persistent_workers"] = True  # no worker start-up inside the timed epochs
    network = parser.get_parsed_content("network")
    # the bundles move the network to channels-last on CUDA; undo/apply it per setting
    network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    trainer = parser.get_parsed_content("train#trainer")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rate = training.iterations_per_second(trainer, device)
    batch = int(parser.get_parsed_content("batch_size"))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"it_s": rate, "images_s": rate * batch, "batch": batch, "peak_mib": peak,
            "params_m": sum(p.numel() for p in network.parameters()) / 1e6}  # fmt: skip


def run_training(section: Section, settings: Settings, budget: Budget, dataset_dirs: dict[int, str], tmp: str) -> None:
    """Section 1: every method x setting (see the module docstring)."""
    for method in settings.methods:
        size = settings.image_size(method)
        fp32_rate = None
        for name, amp, channels_last, why_not in training_settings(settings.device):
            row = {"method": method, "image": f"{size} x {size}", "setting": name}
            if why_not:
                section.rows.append({**row, "note": f"not measured: {why_not}"})
                continue
            if not budget.allows(f"{method} {name}"):
                continue
            result = measure_training(method, settings, dataset_dirs[size], f"{tmp}/{method}", amp, channels_last)
            fp32_rate = result["it_s"] if amp is None and not channels_last else fp32_rate
            note = f"{result['it_s'] / fp32_rate:.2f}x fp32" if fp32_rate else ""
            section.rows.append({**row, **result, "note": note})
            _progress(f"training {method} {name}: {result['it_s']:.2f} it/s")


def training_table(section: Section) -> list[tuple[str, ...]]:
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    return [(r["method"], r["image"], cell(r, "batch", "d"), cell(r, "params_m", ".3g"), r["setting"],
             cell(r, "it_s", ".3g"), cell(r, "images_s", ".3g"), cell(r, "peak_mib", ".0f"), r["note"])
            for r in section.rows]  # fmt: skip


# --------------------------------------------------------------------------------------------- sampling


def run_sampling(section: Section, settings: Settings, budget: Budget) -> None:
    """Section 2: ``sampling_methods.method_rows`` of every method at its paper size and network."""
    device = settings.device
    amp = sampling_methods.amp_dtype(device)
    max_rows = sampling_methods.fast_max_rows(4, device)  # a GPU takes all N rows in one call
    official_rate = None
    methods = ["cimd", *(m for m in settings.methods if m != "cimd")]  # the official loop first: the ratios
    for method in methods:
        if not budget.allows(method):
            continue
        size = settings.image_size(method)
        make_parser = partial(sampling_methods.load_method, method, device, settings.overlays(method),
                              settings.overrides(method))  # fmt: skip
        image = torch.randn(1, 1, size, size, device=device)
        rows, official_rate = sampling_methods.method_rows(method, make_parser, image, settings.num_samples,
                                                           settings.timed_steps, settings.repeats, amp, max_rows,
                                                           official_rate)  # fmt: skip
        if method not in settings.methods:
            rows = [r for r in rows if r[1].startswith("official")]  # measured for the ratios only
        for name, setting, rate, ratio in rows:
            section.rows.append({"method": name, "image": f"{size} x {size}", "setting": setting, "masks_s": rate,
                                 "ratio": ratio or "-"})  # fmt: skip
        _progress(f"sampling {method}: " + ", ".join(f"{r[2]:.3g}" for r in rows) + " masks/s")


# ------------------------------------------------------------------------------------------ torchscript


def export_untrained(method: str, settings: Settings, folder: Path) -> tuple[Path, Any]:
    """Export the bundle's untrained network (speed does not depend on the weights) as ``ambiseg export`` does.

    Returns the ``.ts`` file (its weights next to it as ``.pt``) and the export report.
    """
    from ambiseg_monai.deploy.export import export_bundle

    device, size = settings.device, settings.image_size(method)
    torch.manual_seed(0)
    parser = sampling_methods.load_method(method, torch.device("cpu"), settings.overlays(method),
                                          settings.overrides(method))  # fmt: skip
    overrides = {**settings.overrides(method), "num_inference_samples": settings.num_samples}
    if method not in sampling_methods.LATENT:  # the fast setting's steps; no progress bar
        overrides.update(
            inference_steps=sampling_methods.DIFFUSION_STEPS[method][1], **{"infer#inferer#progress": False}
        )
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / f"{method}.pt")
    configs = REPO / "bundles" / method / "configs"
    files = [configs / "train.json", *(configs / o for o in settings.overlays(method)), configs / "inference.json"]
    tolerance = 1e-3 if device.type == "cuda" else 1e-4  # TF32 / kernel choice on a GPU
    report = export_bundle(REPO / "bundles" / method, folder / f"{method}.ts", ckpt_file=folder / f"{method}.pt",
                           config_files=files, overrides=overrides, spatial_shape=(size, size), tolerance=tolerance,
                           device=device, overwrite=True)  # fmt: skip
    return folder / f"{method}.ts", report


def run_torchscript(section: Section, settings: Settings, budget: Budget, tmp: str) -> None:
    """Section 3: eager vs exported (traced) network: one network call on N rows, and masks/s."""
    from ambiseg_monai.deploy.exported import load_exported_bundle

    device, n, r = settings.device, settings.num_samples, max(settings.repeats, 2)
    for method in (m for m in TORCHSCRIPT_METHODS if m in settings.methods):
        if not budget.allows(method):
            continue
        size = settings.image_size(method)
        path, report = export_untrained(method, settings, Path(tmp) / "export")
        exported = load_exported_bundle(path, device).network.eval()
        parser = sampling_methods.load_method(method, device, settings.overlays(method), settings.overrides(method))
        eager = parser.get_parsed_content("network_def").to(device).eval()
        eager.load_state_dict(torch.load(path.with_suffix(".pt"), map_location=device, weights_only=True))
        image = torch.randn(1, 1, size, size, device=device)
        timings = {}
        with torch.no_grad():
            if method in sampling_methods.LATENT:
                call = "prior sample (N masks, 1 call)"
                for name, model in (("eager", eager), ("TorchScript", exported)):
                    seconds = best_seconds(partial(model.sample, image, n), device, r, warmup=True)
                    timings[name] = (seconds, n / seconds)
            else:
                call = f"network call ({n} rows)"
                steps = sampling_methods.DIFFUSION_STEPS[method][1]
                inferer = sampling_methods.diffusion_inferer(method, parser, n, steps)
                inferer(image, eager, image_ids=["warm"])  # sets the scheduler's timesteps
                cond = eager.encode_condition(image.expand(n, -1, -1, -1))
                x = torch.randn(n, 1, size, size, device=device)
                t = inferer.scheduler.timesteps[0].reshape(1).expand(n).to(device)  # what the sampler passes
                for name, model in (("eager", eager), ("TorchScript", exported)):
                    seconds = best_seconds(partial(model, x, t, cond=cond), device, r, warmup=True)
                    inferer(image, model, image_ids=["warm"])
                    sample_s = best_seconds(partial(inferer, image, model, image_ids=["x"]), device, r)
                    timings[name] = (seconds, n / sample_s)
        for name, (seconds, rate) in timings.items():
            masks = "N masks per call" if method in sampling_methods.LATENT else f"fast sampler ({steps} steps)"
            ratio = f"{timings['eager'][0] / seconds:.2f}x eager"
            section.rows.append({"method": method, "image": f"{size} x {size}", "model": name, "call": call,
                                 "ms_per_call": 1e3 * seconds, "masks_s": rate, "masks_setting": masks,
                                 "ratio": ratio, "max_abs_diff": report.max_abs_diff})  # fmt: skip
        _progress(f"torchscript {method}: eager {1e3 * timings['eager'][0]:.2f} ms, "
                  f"traced {1e3 * timings['TorchScript'][0]:.2f} ms per call")  # fmt: skip
    section.notes.append("float32 on both sides; the export is verified against the eager network "
                         "(max abs diff of its checks in the last column)")  # fmt: skip


# ------------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_skip_reason(device: torch.device) -> str:
    """Why the DDP smoke run cannot run here ("" when it can: 2 or more GPUs)."""
    if device.type != "cuda":
        return "no CUDA device (0 GPUs; it needs 2); tests/test_engines_distributed.py runs DDP on CPU with gloo"
    count = torch.cuda.device_count()
    return "" if count >= 2 else f"{count} GPU present (it needs 2)"


def run_ddp(section: Section, settings: Settings, budget: Budget, dataset_dir: str, tmp: str) -> None:
    """Section 4: CIMD's ``multi_gpu_train.json`` in 2 processes (torchrun, NCCL), one epoch with validation."""
    configs = REPO / "bundles" / "cimd" / "configs"
    files = [configs / "train.json", configs / PAPER["cimd"][0], configs / "multi_gpu_train.json"]
    overrides = {"dataset_dir": dataset_dir, "output_dir": f"{tmp}/ddp/run", "tracking_uri": f"sqlite:///{tmp}/ddp.db",
                 "max_epochs": 1, "val_interval": 1, "num_workers": 0, "num_val_samples": 2,
                 "val_inference_steps": 5, "log_mlflow_model": False, **settings.overrides("cimd")}  # fmt: skip
    cwd = Path(tmp) / "ddp"  # MLflow's artifacts go to the working directory; it reads the bundles from there
    cwd.mkdir(exist_ok=True)
    (cwd / "bundles").symlink_to(REPO / "bundles", target_is_directory=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "monai.bundle", "run", "training",
               "--config_file", json.dumps([str(f) for f in files])]  # fmt: skip
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    start = time.perf_counter()
    left = budget.seconds - (time.perf_counter() - budget.start)
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=max(left, 1.0))
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    epoch = next((line.split(" - ")[-1] for line in log.splitlines() if " - epoch 1/1: " in line), "no epoch line")
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited {done.returncode}: {log.strip()[-800:]}")
    backend = "nccl" if settings.device.type == "cuda" else "gloo"
    network = "tiny network" if settings.tiny else "paper network"
    section.rows.append({"processes": 2, "backend": backend, "bundle": f"cimd ({network})",
                         "seconds": seconds, "result": epoch})  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # progress; the tables go to stdout


def section_lines(section: Section) -> list[str]:
    """The Markdown of one section: title, table (if it measured anything), then skip / error lines."""
    lines = [f"## {section.title}", ""]
    if section.status == "skipped":
        return [*lines, f"SKIPPED {section.name}: {section.reason}", ""]
    if section.rows:
        if section.name == "training":
            rows = training_table(section)
        elif section.name == "sampling":
            rows = [(r["method"], r["image"], r["setting"], f"{r['masks_s']:.3g}", r["ratio"]) for r in section.rows]
        elif section.name == "torchscript":
            rows = [(r["method"], r["image"], r["model"], r["call"], f"{r['ms_per_call']:.3g}",
                     f"{r['masks_s']:.3g} ({r['masks_setting']})", r["ratio"], f"{r['max_abs_diff']:.2g}")
                    for r in section.rows]  # fmt: skip
        else:
            rows = [
                (r["processes"], r["backend"], r["bundle"], f"{r['seconds']:.0f}", r["result"]) for r in section.rows
            ]
        lines += [*format_table(section.header, rows), ""]
    lines += [f"note: {note}" for note in section.notes]
    if section.not_measured:
        lines.append(f"TIME BUDGET of {section.name} spent; not measured: {', '.join(section.not_measured)}")
    if section.status == "error":
        lines.append(f"ERROR in {section.name} (the other sections ran): {section.reason}")
    return [*lines, f"({section.name}: {section.seconds:.0f} s)", ""]


HEADERS = {
    "training": ("Training throughput (paper networks and image sizes)",
                 ("method", "image", "batch", "params M", "setting", "it/s", "images/s", "peak MiB", "note")),
    "sampling": ("Sampling (N masks of one image; official CIMD loop, paper and fast settings)",
                 ("method", "image", "setting", "masks/s", "ratio")),
    "torchscript": ("Exported TorchScript model vs eager network",
                    ("method", "image", "model", "call", "ms per call", "masks/s", "ratio", "max abs diff")),
    "ddp": ("DDP smoke run (2 processes)", ("processes", "backend", "bundle", "seconds", "result")),
}  # fmt: skip


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU, CI): the same tables in about a minute")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--budget",
        nargs="+",
        default=[],
        metavar="SECTION=SECONDS",
        help=f"time budget per section (GPU defaults {GPU_BUDGETS}; --tiny {TINY_BUDGETS})",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training data loader processes (default: 4 on a GPU, 0 with --tiny or on a CPU)",
    )
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    parser.add_argument("--json", default=None, help="write every row as JSON here")
    return parser.parse_args(argv)  # fmt: skip


def make_settings(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    budgets = dict(TINY_BUDGETS if args.tiny else GPU_BUDGETS)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not seconds:
            raise SystemExit(f"--budget takes SECTION=SECONDS with SECTION in {SECTIONS}; got {item!r}")
        budgets[name] = float(seconds)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" and not args.tiny else 0)
    if args.tiny:
        return Settings(True, device, tuple(args.methods), num_samples=4, warmup_iterations=2, timed_epochs=1,
                        timed_steps=2, repeats=1, workers=workers, budgets=budgets)  # fmt: skip
    return Settings(False, device, tuple(args.methods), num_samples=16, warmup_iterations=10, timed_epochs=2,
                    timed_steps=50, repeats=2, workers=workers, budgets=budgets)  # fmt: skip


def run_section(name: str, settings: Settings, body: Callable[[Section, Budget], None], skip: str = "") -> Section:
    """Run ``body`` under the section's time budget; an error or the budget ends it, the next one runs."""
    title, header = HEADERS[name]
    if settings.tiny:
        title = title.replace("paper networks and image sizes", f"--tiny: tiny networks, {TINY_SIZE} x {TINY_SIZE}")
    section = Section(name, title, header)
    if skip:
        section.status, section.reason = "skipped", skip
        _progress(f"SKIPPED {name}: {skip}")
        return section
    seconds = settings.budgets[name]
    budget = Budget(section, seconds)
    start = time.perf_counter()
    try:
        with time_limit(seconds + HARD_LIMIT_GRACE_S):  # the soft limit stops between items, this one inside one
            body(section, budget)
    except SectionTimeout:
        section.status = "over budget"
        section.not_measured.append(f"{budget.current or 'the item running'} (stopped when the budget ran out)")
    except Exception as error:  # noqa: BLE001 - a lent GPU is precious: report it, go on with the next section
        section.status = "error"
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        section.reason = last[-1500:]
        _progress(traceback.format_exc())
    if section.not_measured and section.status == "ok":
        section.status = "over budget"
    section.seconds = time.perf_counter() - start
    return section


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected sections; print the Markdown report, write ``--out`` / ``--json``; return the JSON."""
    args = _parse(argv)
    settings = make_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = None if args.out is None else Path(args.out).resolve()
    json_path = None if args.json is None else Path(args.json).resolve()
    info = device_description(settings.device)
    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory() as tmp, working_directory(REPO):  # the bundles read bundles/common from cwd
        sizes = sorted({settings.image_size(m) for m in settings.methods} | {settings.image_size("cimd")})
        # one demo dataset per image size, big enough for the largest paper batch (32); consensus diffusion's
        # overlay resizes to its 256 x 256 itself
        demo_size = {size: min(size, 128) for size in sizes}
        dataset_dirs = {size: ensure_demo_dataset(f"{tmp}/demo{demo_size[size]}", image_size=demo_size[size],
                                                  num_training=8 if settings.tiny else 64, num_validation=2,
                                                  num_test=0)
                        for size in sizes}  # fmt: skip
        bodies: dict[str, tuple[Callable[[Section, Budget], None], str]] = {
            "training": (lambda s, b: run_training(s, settings, b, dataset_dirs, tmp), ""),
            "sampling": (lambda s, b: run_sampling(s, settings, b), ""),
            "torchscript": (lambda s, b: run_torchscript(s, settings, b, tmp), ""),
            "ddp": (lambda s, b: run_ddp(s, settings, b, dataset_dirs[settings.image_size("cimd")], tmp),
                    ddp_skip_reason(settings.device)),
        }  # fmt: skip
        for name in args.sections:
            body, skip = bodies[name]
            sections.append(run_section(name, settings, body, skip))
    elapsed = time.perf_counter() - started
    setting = "tiny (CPU check)" if settings.tiny else "paper sizes"
    lines = [
        "# GPU check",
        "",
        f"date: {info['date']}; device: {info['device']}; GPUs: {info['gpus']}; torch {info['torch']}"
        + (f"; CUDA {info['cuda']}; cuDNN {info['cudnn']}; {info['memory_gib']} GiB" if "cuda" in info else "")
        + f"; CPU threads: {info['cpu_threads']}; host: {info['host']}",
        f"settings: {setting}; N = {settings.num_samples} masks per image; command: `{command.strip()}`; "
        f"total {elapsed:.0f} s",
        "",
    ]
    for section in sections:
        lines += section_lines(section)
    text = "\n".join(lines)
    print(text, flush=True)
    result = {**info, "settings": setting, "command": command.strip(), "seconds": elapsed,
              "sections": {s.name: {"status": s.status, "reason": s.reason, "seconds": s.seconds, "rows": s.rows,
                                    "not_measured": s.not_measured} for s in sections}}  # fmt: skip
    if out is not None:
        out.write_text(text + "\n")
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
