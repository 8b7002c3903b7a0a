"""Benchmark: the vectorised metric suite against the per-pair NumPy loop reference, on CPU.

Default problem: B = 256 images, N = 16 samples, M = 4 raters, 128 x 128 (the issue's setting), with
lesion-like disc masks (some empty, one image with only 3 real raters). Times every metric of
``ambiseg_monai.metrics.METRIC_NAMES`` computed by ``ambiguous_segmentation_metrics`` (best of
``--repeats`` runs) and by ``benchmarks/reference_metrics.all_metrics`` (one run), prints both times, the
ratio, and the largest per-image difference between the two for every metric.

    python benchmarks/metrics.py [--batch 256 --samples 16 --raters 4 --size 128 --repeats 5 --threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

try:
    from benchmarks import reference_metrics  # imported as a module (tests)
except ImportError:  # run as a script: the loop reference lives next to it, in sys.path[0]
    import reference_metrics

from ambiseg_monai.metrics import METRIC_NAMES, ambiguous_segmentation_metrics


def disc_masks(batch: int, count: int, size: int, generator: torch.Generator, empty_rate: float = 0.15) -> torch.Tensor:
    """B x K x size x size bool discs around a per-image centre with jittered centre and radius."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = size * (0.3 + 0.4 * torch.rand(batch, 1, 2, generator=generator))
    centre = centre + size * 0.05 * torch.randn(batch, count, 2, generator=generator)
    radius = size * (0.05 + 0.15 * torch.rand(batch, count, generator=generator))
    radius = torch.where(torch.rand(batch, count, generator=generator) < empty_rate, torch.zeros_like(radius), radius)
    dist2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
    return dist2 < radius[..., None, None] ** 2


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--raters", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="vectorised runs; the best time is reported")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as the loops use one core; 0: default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    preds = disc_masks(args.batch, args.samples, args.size, generator)
    raters = disc_masks(args.batch, args.raters, args.size, generator)
    rater_mask = torch.ones(args.batch, args.raters, dtype=torch.bool)
    if args.raters > 1:
        rater_mask[0, -1] = False  # a QUBIQ-like image with one rater fewer
        raters[0, -1] = False

    vector_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = ambiguous_segmentation_metrics(preds, raters, rater_mask, metrics=METRIC_NAMES)
        vector_times.append(time.perf_counter() - start)
    vector_time = min(vector_times)

    preds_np, raters_np, mask_np = preds.numpy(), raters.numpy(), rater_mask.numpy()
    start = time.perf_counter()
    slow = reference_metrics.all_metrics(preds_np, raters_np, mask_np)
    loop_time = time.perf_counter() - start

    print(
        f"problem: B={args.batch} N={args.samples} M={args.raters} {args.size}x{args.size}, "
        f"{len(METRIC_NAMES)} metrics, torch threads={torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(f"vectorised suite : {vector_time:8.3f} s (best of {args.repeats})")
    print(f"per-pair loops   : {loop_time:8.3f} s")
    print(f"speed-up         : {loop_time / vector_time:8.1f}x")
    worst = 0.0
    for name in METRIC_NAMES:
        diff = float(np.max(np.abs(fast[name].numpy() - slow[name])))
        worst = max(worst, diff)
        print(f"  max |vectorised - loop| {name:22s} {diff:.2e}   mean {float(fast[name].mean()):.4f}")
    print(f"agreement within 1e-6: {worst <= 1e-6} (worst {worst:.2e})")


if __name__ == "__main__":
    main()
