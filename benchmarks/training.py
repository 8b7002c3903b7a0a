"""Training throughput (iterations/s) and peak memory per method, with and without AMP / channels-last,
against the data loader alone (it must not be the bottleneck).

Each method's own ``SupervisedTrainer`` is built from ``bundles/<method>/configs/train.json`` on the demo
dataset (only epochs, ``amp`` and the memory format are changed; no handlers), run for
``--epochs`` epochs, and timed over the iterations after the first epoch (warm-up). The loader rows
iterate ``train#dataloader`` alone (loading, rater selection, augmentation, collation) for the same number of
batches: the bundle's (an ``UntrackedCompose``), and the same transforms in a plain ``Compose`` (MONAI's
MetaTensor tracking on).

Settings: ``fp32`` (contiguous); ``fp32+CL`` (channels-last weights); on CUDA also ``AMP`` and
``AMP+CL`` (fp16 autocast + GradScaler, the bundles' default on GPU). Peak memory is CUDA's
``max_memory_allocated`` (on CPU: not measured, shown as -).

    python benchmarks/training.py                                   # CPU: 32 px demo, 3 epochs
    python benchmarks/training.py --image-size 128 --epochs 5       # GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from ambiseg_monai.bundle.config import resolve_macros
from ambiseg_monai.data.demo import ensure_demo_dataset

try:
    from benchmarks._common import print_table
    from benchmarks.timing import synchronize
except ImportError:  # run as a script: this folder is sys.path[0]
    from _common import print_table
    from timing import synchronize

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
METHODS = ("cimd", "ambdiffseg", "consensus_diffusion", "prob_unet", "phiseg", "ssn")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--image-size", type=int, default=32, help="demo image size")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per setting (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dataset-dir", default=None, help="demo dataset (generated if missing)")
    return parser.parse_args()


def _settings(device: torch.device) -> list[tuple[str, bool, bool]]:
    """(name, amp, channels_last)."""
    base = [("fp32", False, False), ("fp32+CL", False, True)]
    return base + ([("AMP", True, False), ("AMP+CL", True, True)] if device.type == "cuda" else [])


def trainer_parser(
    method: str, dataset_dir: str, output_dir: str, epochs: int, amp: bool,
    overlays: Sequence[str] = (), overrides: Mapping[str, Any] | None = None,
) -> ConfigParser:  # fmt: skip
    """The bundle's ``train.json`` (then ``overlays``, e.g. ``lidc.json``, and ``overrides``) on ``dataset_dir``,
    with no training handlers."""
    parser = ConfigParser()
    configs = BUNDLES / method / "configs"
    parser.read_config([str(configs / "train.json"), *(str(configs / name) for name in overlays)])
    parser.update({"dataset_dir": dataset_dir, "demo_dir": dataset_dir, "output_dir": output_dir,
                   "max_epochs": epochs, "amp": amp, **(overrides or {})})  # fmt: skip
    resolve_macros(parser, BUNDLES.parent)  # the pieces from bundles/common, to edit them by path below
    parser["train#trainer#train_handlers"] = []
    return parser


def iterations_per_second(trainer, device: torch.device | None = None) -> float:
    """Run the trainer; iterations/s over every epoch after the first (warm-up).

    ``device``: a CUDA device's queued work is waited for at each epoch's end (see :func:`timing.synchronize`).
    """
    marks: list[float] = []

    def mark(_) -> None:
        if device is not None:
            synchronize(device)
        marks.append(time.perf_counter())

    trainer.add_event_handler(Events.EPOCH_COMPLETED, mark)
    trainer.run()
    per_epoch = trainer.state.epoch_length
    return per_epoch * (len(marks) - 1) / (marks[-1] - marks[0])


def loader_batches_per_second(loader, batches: int) -> float:
    """Batches/s of the loader alone (one warm-up pass over it first)."""
    for _ in loader:
        pass
    start, count = time.perf_counter(), 0
    while count < batches:
        for _ in loader:
            count += 1
            if count >= batches:
                break
    return count / (time.perf_counter() - start)


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = ensure_demo_dataset(args.dataset_dir or f"{tmp}/demo", image_size=args.image_size)
        for method in args.methods:
            for name, amp, channels_last in _settings(device):
                torch.manual_seed(0)
                parser = trainer_parser(method, dataset_dir, f"{tmp}/{method}", args.epochs, amp)
                network = parser.get_parsed_content("network")
                # the bundles move the network to channels-last on CUDA; undo/apply it per setting
                network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                trainer = parser.get_parsed_content("train#trainer")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rate = iterations_per_second(trainer, device)
                peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "-"
                rows.append((method, name, rate, peak))
                # progress; the table goes to stdout
                print(f"{method} {name}: {rate:.2f} it/s, peak {peak} MiB", file=sys.stderr, flush=True)
            batches = trainer.state.epoch_length * (args.epochs - 1)
            fastest = max(r[2] for r in rows if r[0] == method)
            # the bundles' UntrackedCompose against a plain Compose of the same transforms (MetaTensor tracking)
            for name, target in (("loader alone", None), ("loader, tracked Compose", "Compose")):
                if target is not None:
                    parser["train#preprocessing#_target_"] = target
                loader = parser.get_parsed_content("train#dataloader", instantiate=True, lazy=False)
                loader_rate = loader_batches_per_second(loader, batches)
                rows.append((method, name, loader_rate, f"{loader_rate / fastest:.1f}x the fastest training"))
    print(f"\ndevice={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}) "
          f"threads={args.threads} image_size={args.image_size} epochs={args.epochs} (first is warm-up)")  # fmt: skip
    header = ("method", "setting", "it/s (loader: batches/s)", "peak MiB / note")
    print_table(header, ((method, name, f"{rate:.2f}", extra) for method, name, rate, extra in rows))


if __name__ == "__main__":
    main()
