"""Benchmark: the vectorised metric suite against the per-pair NumPy loop reference, on CPU.

Default problem: B = 256 images, N = 16 samples, M = 4 raters, 128 x 128 (the issue's setting), with
lesion-like disc masks (some empty, one image with only 3 real raters). Times every metric of
``ambiseg_monai.metrics.METRIC_NAMES`` computed by ``ambiguous_segmentation_metrics`` (best of
``--repeats`` runs, wall clock and this process's CPU time) and by ``benchmarks/reference_metrics.all_metrics``
(one run), prints both times, the ratio, the machine's load average (``os.getloadavg``, before and after)
and the largest per-image difference between the two for every metric.

``--compare`` also times the previous implementation of the suite (the library before the per-pixel counts
became byte sums, S_NCC's histogram one pass per 8 raters and the combined sensitivity an integer count;
its code is kept here, in :func:`previous_implementation`), alternating its runs with the current ones so
both see the same load, and prints both against the loop reference and against each other.

    python benchmarks/metrics.py [--batch 256 --samples 16 --raters 4 --size 128 --repeats 5 --threads 1]
                                 [--compare]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from unittest import mock

import numpy as np
import torch

try:  # imported as a module (tests)
    from benchmarks import reference_metrics
    from benchmarks.timing import best_wall_and_cpu_seconds
except ImportError:  # run as a script: the loop reference and the timer live next to it, in sys.path[0]
    import reference_metrics  # type: ignore[no-redef]
    from timing import best_wall_and_cpu_seconds  # type: ignore[no-redef]

import ambiseg_monai.metrics.ncc as ncc_module
import ambiseg_monai.metrics.suite as suite_module
from ambiseg_monai.metrics import METRIC_NAMES, ambiguous_segmentation_metrics
from ambiseg_monai.metrics.pairwise import MaskSetOverlaps


def disc_masks(batch: int, count: int, size: int, generator: torch.Generator, empty_rate: float = 0.15) -> torch.Tensor:
    """B x K x size x size bool discs around a per-image centre with jittered centre and radius."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = size * (0.3 + 0.4 * torch.rand(batch, 1, 2, generator=generator))
    centre = centre + size * 0.05 * torch.randn(batch, count, 2, generator=generator)
    radius = size * (0.05 + 0.15 * torch.rand(batch, count, generator=generator))
    radius = torch.where(torch.rand(batch, count, generator=generator) < empty_rate, torch.zeros_like(radius), radius)
    dist2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
    return dist2 < radius[..., None, None] ** 2


# --- The previous implementation (library at commit d46f3c5), kept only for --compare -------------------


def _previous_counts_int8(
    preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram matrix and per-pixel counts as before: the counts from an int8 product with selector rows."""
    batch, num_preds = preds.shape[:2]
    selectors = torch.zeros(batch, 2, num_preds + raters.shape[1], dtype=torch.int8)
    selectors[:, 0, :num_preds] = 1
    selectors[:, 1, num_preds:] = rater_mask.to(torch.int8)
    grams, count_rows = [], []
    for image in range(batch):
        rows = torch.cat([preds[image], raters[image]]).view(torch.int8)
        grams.append(torch._int_mm(rows, rows.t()))
        count_rows.append(torch._int_mm(selectors[image], rows))
    counts = torch.stack(count_rows)
    return torch.stack(grams), counts[:, 0], counts[:, 1]


def _previous_from_masks(
    cls: type[MaskSetOverlaps], preds: torch.Tensor, raters: torch.Tensor, rater_mask: torch.Tensor
) -> MaskSetOverlaps:
    """``MaskSetOverlaps.from_masks`` as before (its CPU int8 path), with int32 per-pixel counts."""
    batch, num_preds = preds.shape[:2]
    num_pixels = preds.shape[-2] * preds.shape[-1]
    preds, raters = preds.reshape(batch, num_preds, num_pixels), raters.reshape(batch, -1, num_pixels)
    gram, pred_count, rater_votes = _previous_counts_int8(preds, raters, rater_mask)
    return cls.from_gram(gram, pred_count, rater_votes, rater_mask, num_pixels)


def _previous_rater_level_histogram(
    pred_count: torch.Tensor, levels: int, raters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_NCC's histograms as before: one B x M x P index, one pass per rater."""
    batch, num_raters, num_pixels = raters.shape
    num_bins = batch * num_raters * levels * 2
    index_dtype = torch.int32 if num_bins < 2**31 else torch.int64
    counts = pred_count.to(index_dtype)
    offsets = torch.arange(batch * num_raters, dtype=index_dtype).view(batch, num_raters, 1)
    index = raters.to(index_dtype)
    index += (2 * counts)[:, None]
    index += offsets * (2 * levels)
    histogram = torch.bincount(index.flatten(), minlength=num_bins)
    histogram = histogram.view(batch, num_raters, levels, 2).to(torch.float64)
    return histogram[..., 1], histogram[:, 0].sum(-1)


def _previous_combined_sensitivity(overlaps: MaskSetOverlaps) -> torch.Tensor:
    """Combined sensitivity as before: bool unions summed along the pixels."""
    pred_union = overlaps.pred_count > 0
    gt_union = overlaps.rater_votes > 0
    true_positive = (pred_union & gt_union).sum(1).to(torch.float64)
    gt_area = gt_union.sum(1).to(torch.float64)
    return torch.where(gt_area > 0, true_positive / gt_area.clamp_min(1), torch.ones_like(gt_area))


@contextlib.contextmanager
def previous_implementation() -> Iterator[None]:
    """Run the suite with the three stages this change replaced swapped back in (CPU int8 path)."""
    with (
        mock.patch.object(MaskSetOverlaps, "from_masks", classmethod(_previous_from_masks)),
        mock.patch.object(ncc_module, "rater_level_histogram", _previous_rater_level_histogram),
        mock.patch.object(suite_module, "combined_sensitivity_from_overlaps", _previous_combined_sensitivity),
    ):
        yield


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
    parser.add_argument(
        "--compare", action="store_true", help="also time the previous implementation, alternating with this one"
    )
    return parser.parse_args(argv)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min, {os.cpu_count()} CPUs)"


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print its report and return the timings (seconds) and the worst difference."""
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _load()

    generator = torch.Generator().manual_seed(args.seed)
    preds = disc_masks(args.batch, args.samples, args.size, generator)
    raters = disc_masks(args.batch, args.raters, args.size, generator)
    rater_mask = torch.ones(args.batch, args.raters, dtype=torch.bool)
    if args.raters > 1:
        rater_mask[0, -1] = False  # a QUBIQ-like image with one rater fewer
        raters[0, -1] = False

    def current() -> dict[str, torch.Tensor]:
        return ambiguous_segmentation_metrics(preds, raters, rater_mask, metrics=METRIC_NAMES)

    def previous() -> dict[str, torch.Tensor]:
        with previous_implementation():
            return current()

    fast = current()  # untimed warm-up of both (allocator, kernel selection)
    candidates = {"current": current}
    if args.compare:
        old = previous()
        candidates["previous"] = previous
    best = {name: [float("inf"), float("inf")] for name in candidates}
    for _ in range(max(1, args.repeats)):  # alternating runs: both implementations see the same load
        for name, fn in candidates.items():
            wall, cpu = best_wall_and_cpu_seconds(fn, torch.device("cpu"), repeats=1)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]

    preds_np, raters_np, mask_np = preds.numpy(), raters.numpy(), rater_mask.numpy()
    start, start_cpu = time.perf_counter(), time.process_time()
    slow = reference_metrics.all_metrics(preds_np, raters_np, mask_np)
    loop_time, loop_cpu = time.perf_counter() - start, time.process_time() - start_cpu

    print(
        f"problem: B={args.batch} N={args.samples} M={args.raters} {args.size}x{args.size}, "
        f"{len(METRIC_NAMES)} metrics, torch threads={torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(f"load average before: {load_before}")
    print(f"{'':26s} {'wall':>9s} {'CPU':>9s}  {'loops / it (wall)':>17s}  {'(CPU)':>7s}")
    for name, (wall, cpu) in best.items():
        label = f"vectorised, {name}"
        print(
            f"{label:26s} {wall:8.3f}s {cpu:8.3f}s  {loop_time / wall:16.1f}x  {loop_cpu / cpu:6.1f}x"
            f"   (best of {args.repeats})"
        )
    print(f"{'per-pair loops':26s} {loop_time:8.3f}s {loop_cpu:8.3f}s")
    if args.compare:
        wall_ratio = best["previous"][0] / best["current"][0]
        cpu_ratio = best["previous"][1] / best["current"][1]
        print(f"current vs previous: {wall_ratio:.2f}x faster (wall), {cpu_ratio:.2f}x (CPU)")
    print(f"load average after : {_load()}")
    worst = 0.0
    for name in METRIC_NAMES:
        diff = float(np.max(np.abs(fast[name].numpy() - slow[name])))
        worst = max(worst, diff)
        print(f"  max |vectorised - loop| {name:22s} {diff:.2e}   mean {float(fast[name].mean()):.4f}")
    print(f"agreement within 1e-6: {worst <= 1e-6} (worst {worst:.2e})")
    result = {"current_s": best["current"][0], "current_cpu_s": best["current"][1], "loop_s": loop_time}
    result["worst_difference"] = worst
    if args.compare:
        same = all(torch.equal(fast[name], old[name]) for name in METRIC_NAMES)
        print(f"current and previous results identical: {same}")
        result.update(previous_s=best["previous"][0], previous_cpu_s=best["previous"][1], identical=float(same))
    return result


if __name__ == "__main__":
    main()
