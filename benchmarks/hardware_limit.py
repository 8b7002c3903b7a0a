"""How far from the hardware limit: counted FLOPs and achieved FLOP/s of CIMD sampling and training vs the CPU's peak.

Workloads (the CIMD bundle's own network, ``bundles/cimd/configs/train.json``, untrained: the FLOPs and
the speed do not depend on the weights):

- ``network call``: one call of the fast setting's network on ``--rows`` rows (4: the CPU fast
  setting's rows per call), in bfloat16 autocast where the CPU has native bf16 (as the fast setting)
  and, for comparison, in float32;
- ``fast sampler``: the fast setting end to end (``benchmarks/sampling_methods.py``'s inferer: N = rows
  masks, 25 respaced steps, the condition encoded once), timed on a ``--timed-steps`` chain and
  extrapolated linearly to 25 steps as ``sampling_methods.py`` does (the printout says so);
- ``training iteration``: the bundle's training step: ``train#inferer`` (t and noise drawn, the network
  called under the bundle's ``mixed_precision``), ``train#loss`` (hybrid loss + ambiguity KL),
  ``backward`` and the bundle's Adam step, on a random batch with 4 raters (no handlers, no EMA).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add of the
convolutions, matrix products and attention; element-wise work such as normalisation and activations
is not counted, so the achieved rate is a lower bound of the work done). Time is the best of
``--repeats`` runs, both wall clock and this process's CPU time; the achieved rate is FLOPs per
CPU-second (per wall-second in brackets), because on a shared machine the wall clock also counts the
time spent waiting for a core.

The peak is stated, not guessed: ``threads x clock x FLOPs/cycle/core`` with the FLOPs per cycle of the
best instruction set in ``/proc/cpuinfo``'s flags (see :func:`flops_per_cycle`; ``--fma-units`` and
``--clock-ghz`` change the assumptions, ``--peak-gflops`` replaces the result), plus a measured
roofline: a large ``torch.mm`` in float32 and bfloat16 on the same threads, the practical peak of the
same math library.

    python benchmarks/hardware_limit.py                          # 64 x 64, 1 thread
    python benchmarks/hardware_limit.py --image-size 128 --train-batch 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# importing monai imports monai.deploy, whose holoscan warns about the stack size; nothing here uses it
warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

try:
    from benchmarks._common import print_table
    from benchmarks.sampling_methods import DIFFUSION_STEPS, _autocast, diffusion_inferer, amp_dtype, load_method
    from benchmarks.timing import best_wall_and_cpu_seconds
except ImportError:  # run as a script: this folder is sys.path[0]
    from _common import print_table
    from sampling_methods import DIFFUSION_STEPS, _autocast, diffusion_inferer, amp_dtype, load_method
    from timing import best_wall_and_cpu_seconds

FAST_STEPS = DIFFUSION_STEPS["cimd"][1]
# AMX TMUL (Sapphire Rapids and later): TDPBF16PS adds a (16 x 32) x (32 x 16) bf16 product to a
# 16 x 16 fp32 tile, 8192 multiply-adds, one every 16 cycles: 512 multiply-adds = 1024 FLOPs per cycle
AMX_BF16_FLOPS_PER_CYCLE = 1024


# ---- the pure calculation: the peak from the flags and the clock, utilisation -------------------


@dataclass(frozen=True)
class CpuInfo:
    """What ``/proc/cpuinfo`` says about the CPU: model name, flags (of the first CPU), clock, CPU count."""

    model: str
    flags: frozenset[str]
    mhz: float
    logical_cpus: int


def parse_cpuinfo(text: str) -> CpuInfo:
    """Read the model name, flags and ``cpu MHz`` of the first processor block, and count the blocks."""
    fields: dict[str, str] = {}
    count = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            count += 1
        fields.setdefault(key, value.strip())
    return CpuInfo(
        model=fields.get("model name", platform.processor() or "unknown"),
        flags=frozenset(fields.get("flags", "").split()),
        mhz=float(fields.get("cpu MHz", "0") or 0),
        logical_cpus=count,
    )


@dataclass(frozen=True)
class PerCycle:
    """FLOPs per cycle per core for one dtype, the instruction set they come from, and how they add up."""

    flops: int
    isa: str
    reasoning: str


def flops_per_cycle(flags: frozenset[str] | set[str], dtype: str, fma_units: int = 2) -> PerCycle:
    """Peak FLOPs per cycle per core of ``dtype`` ("float32" or "bfloat16") for a CPU with these flags.

    float32: ``fma_units x fp32 lanes x 2`` with FMA (AVX-512: 16 lanes, AVX2: 8); without FMA one
    add and one multiply port: ``2 x lanes`` (AVX: 8 lanes, SSE2: 4). ``fma_units`` is an assumption
    (2 on Xeon Gold / Platinum and most AMD Zen 4/5; 1 on some Xeon Silver / Bronze), not in the flags.
    bfloat16: AMX (``amx_bf16``): 1024 (the tile multiply, independent of ``fma_units``); AVX512-BF16
    (``avx512_bf16``): twice AVX-512 float32 (``VDPBF16PS``: each fp32 lane adds 2 bf16 products);
    otherwise bf16 is computed in float32 (no gain), so the float32 figure.
    """
    flags = frozenset(flags)
    has_fma = "fma" in flags
    if "avx512f" in flags and has_fma:
        fp32 = PerCycle(fma_units * 16 * 2, "AVX-512 FMA", f"{fma_units} FMA units x 16 fp32 lanes x 2")
    elif "avx2" in flags and has_fma:
        fp32 = PerCycle(fma_units * 8 * 2, "AVX2 FMA", f"{fma_units} FMA units x 8 fp32 lanes x 2")
    elif "avx" in flags:
        fp32 = PerCycle(2 * 8, "AVX", "1 add + 1 multiply port x 8 fp32 lanes")
    elif "sse2" in flags:
        fp32 = PerCycle(2 * 4, "SSE2", "1 add + 1 multiply port x 4 fp32 lanes")
    else:
        fp32 = PerCycle(2, "scalar", "1 add + 1 multiply per cycle")
    if dtype == "float32":
        return fp32
    if dtype != "bfloat16":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    if "amx_bf16" in flags and "amx_tile" in flags:
        return PerCycle(AMX_BF16_FLOPS_PER_CYCLE, "AMX-BF16", "1 tile multiply: 512 bf16 multiply-adds x 2")
    if "avx512_bf16" in flags and fp32.isa == "AVX-512 FMA":
        return PerCycle(2 * fp32.flops, "AVX512-BF16", f"{fma_units} FMA units x 16 fp32 lanes x 2 products x 2")
    return PerCycle(fp32.flops, f"{fp32.isa} (no native bf16)", f"as float32: {fp32.reasoning}")


def peak_gflops(cores: int, clock_ghz: float, per_cycle: int) -> float:
    """The theoretical peak ``cores x clock x FLOPs/cycle/core`` in GFLOP/s."""
    return cores * clock_ghz * per_cycle


def utilisation(achieved_gflops: float, peak: float) -> float:
    """The achieved rate as a fraction of the peak (0 for a zero or negative peak)."""
    return achieved_gflops / peak if peak > 0 else 0.0


def gflops_per_second(flops: float, seconds: float) -> float:
    """GFLOP/s of ``flops`` done in ``seconds``."""
    return flops / seconds / 1e9


# ---- measurements ----------------------------------------------------------------------------


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """Run ``fn`` once under ``FlopCounterMode``: its total FLOPs and the FLOPs per operator."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def matmul_roofline(size: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(GFLOP/s per CPU-second, per wall-second) of a ``size x size`` ``torch.mm`` in ``dtype``."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    wall, cpu = best_wall_and_cpu_seconds(lambda: torch.mm(a, b), torch.device("cpu"), repeats, warmup=True)
    flops = 2 * size**3
    return gflops_per_second(flops, cpu), gflops_per_second(flops, wall)


# the operators FlopCounterMode counts (the dense math); everything else is element-wise, copies, reductions
DENSE_OPS = ("convolution", "convolution_backward", "mm", "bmm", "addmm", "baddbmm", "_scaled_dot_product")


class _OpTimer(TorchDispatchMode):
    """CPU seconds per ATen operator (below autocast, so its casts show up as ``_to_copy``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.process_time()
        out = func(*args, **(kwargs or {}))
        self.seconds[func.overloadpacket.__name__] += time.process_time() - start
        return out


def op_seconds(fn) -> dict[str, float]:
    """Run ``fn`` once and return the CPU seconds spent in each ATen operator, largest first."""
    with _OpTimer() as timer:
        fn()
    return dict(sorted(timer.seconds.items(), key=lambda item: -item[1]))


def dense_share(seconds: dict[str, float]) -> float:
    """The fraction of the operator time spent in convolutions and matrix products (:data:`DENSE_OPS`)."""
    total = sum(seconds.values())
    dense = sum(v for op, v in seconds.items() if op.startswith(DENSE_OPS))
    return dense / total if total else 0.0


@dataclass
class Workload:
    """One measured workload: FLOPs per run, best CPU and wall seconds per run, the dtype of its math."""

    name: str
    dtype: str
    flops: int
    cpu_s: float
    wall_s: float
    conv_share: float
    op_s: dict[str, float] = field(default_factory=dict)

    @property
    def gflops_cpu(self) -> float:
        return gflops_per_second(self.flops, self.cpu_s)

    @property
    def gflops_wall(self) -> float:
        return gflops_per_second(self.flops, self.wall_s)


def _conv_share(by_op: dict[str, int], total: int) -> float:
    return sum(n for op, n in by_op.items() if "convolution" in op) / total if total else 0.0


def network_call(network, image: torch.Tensor, rows: int, amp: torch.dtype | None, repeats: int) -> Workload:
    """One network call of the sampler on ``rows`` rows (the condition encoded beforehand, as the sampler does)."""
    device = image.device
    with torch.no_grad():
        cond = network.encode_condition(image).expand(rows, -1, -1, -1)
        x = torch.randn(rows, 1, *image.shape[2:])
        t = torch.full((rows,), 500, dtype=torch.long)

        def call() -> None:
            with _autocast(device, amp):
                network(x, t, cond=cond)

        flops, by_op = count_flops(call)
        wall, cpu = best_wall_and_cpu_seconds(call, device, repeats, warmup=True)
        ops = op_seconds(call)
    dtype = "float32" if amp is None else str(amp).removeprefix("torch.")
    return Workload(f"network call, {rows} rows", dtype, flops, cpu, wall, _conv_share(by_op, flops), ops)


def fast_sampler(network, image: torch.Tensor, rows: int, timed_steps: int, amp, repeats: int) -> Workload:
    """The fast setting's inferer (N = ``rows`` masks, one call per step) on a ``timed_steps`` chain."""
    device = image.device
    inferer = diffusion_inferer("cimd", load_method("cimd", device), rows, timed_steps, rows)
    with torch.no_grad(), _autocast(device, amp):
        flops, by_op = count_flops(lambda: inferer(image, network, image_ids=["count"]))
        wall, cpu = best_wall_and_cpu_seconds(lambda: inferer(image, network, image_ids=["x"]), device, repeats, True)
        ops = op_seconds(lambda: inferer(image, network, image_ids=["x"]))
    dtype = "float32" if amp is None else str(amp).removeprefix("torch.")
    name = f"fast sampler, N = {rows}, {timed_steps} of {FAST_STEPS} steps timed"
    return Workload(name, dtype, flops, cpu, wall, _conv_share(by_op, flops), ops)


def training_iteration(size: int, batch: int, repeats: int) -> Workload:
    """The CIMD bundle's training step (inferer, loss, backward, Adam) on a random batch with 4 raters."""
    device = torch.device("cpu")
    parser = load_method("cimd", device)
    network = parser.get_parsed_content("network").train()
    inferer = parser.get_parsed_content("train#inferer")
    loss_fn = parser.get_parsed_content("train#loss")
    optimizer = parser.get_parsed_content("optimizer")
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 1, size, size, generator=generator)
    raters = (torch.rand(batch, 4, size, size, generator=generator) > 0.5).float()
    rater_mask = torch.ones(batch, 4, dtype=torch.bool)
    target = raters[:, :1]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = inferer(image, network, target=target, raters=raters, rater_mask=rater_mask)
        loss_fn(out, target).mean().backward()
        optimizer.step()

    step()  # warm-up (Adam's state, kernel selection)
    flops, by_op = count_flops(step)
    wall, cpu = best_wall_and_cpu_seconds(step, device, repeats)
    ops = op_seconds(step)
    dtype = "float32" if inferer.autocast_dtype is None else str(inferer.autocast_dtype).removeprefix("torch.")
    name = f"training iteration, batch {batch} (fwd + bwd + Adam)"
    return Workload(name, dtype, flops, cpu, wall, _conv_share(by_op, flops), ops)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64, choices=(16, 32, 64, 128))
    parser.add_argument("--rows", type=int, default=4, help="rows per network call = N of the fast sampler")
    parser.add_argument("--timed-steps", type=int, default=5, help=f"steps timed of the {FAST_STEPS}-step chain")
    parser.add_argument("--train-batch", type=int, default=8, help="training batch (the bundle's is 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per workload (best is kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mm-size", type=int, default=2048, help="matrix size of the matmul roofline")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core (assumption)")
    parser.add_argument("--clock-ghz", type=float, default=None, help="clock (default: /proc/cpuinfo's cpu MHz)")
    parser.add_argument(
        "--peak-gflops",
        type=float,
        nargs=2,
        default=None,
        metavar=("FP32", "BF16"),
        help="replace the computed peaks (GFLOP/s for the threads used)",
    )
    parser.add_argument("--no-training", action="store_true", help="skip the training iteration")
    return parser.parse_args(argv)


def _read_cpuinfo() -> CpuInfo:
    path = Path("/proc/cpuinfo")
    return parse_cpuinfo(path.read_text() if path.is_file() else "")


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the tables, return the numbers (for tests and other scripts)."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device("cpu")
    info = _read_cpuinfo()
    clock = args.clock_ghz or info.mhz / 1000
    amp = amp_dtype(device)
    load = os.getloadavg()
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {info.model}, "
        f"{info.logical_cpus} logical CPUs, {clock:.2f} GHz; torch {torch.__version__}; threads {threads}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; image {args.image_size} x {args.image_size}"
    )

    # the peaks: theoretical from the flags, practical from a large matmul
    peaks: dict[str, dict] = {}
    for index, (name, dtype) in enumerate((("float32", torch.float32), ("bfloat16", torch.bfloat16))):
        per = flops_per_cycle(info.flags, name, args.fma_units)
        peak = peak_gflops(threads, clock, per.flops) if args.peak_gflops is None else args.peak_gflops[index]
        mm_cpu, mm_wall = matmul_roofline(args.mm_size, dtype, args.repeats)
        peaks[name] = {
            "isa": per.isa,
            "per_cycle": per.flops,
            "reasoning": per.reasoning,
            "peak": peak,
            "mm": mm_cpu,
            "mm_wall": mm_wall,
        }
    source = "given (--peak-gflops)" if args.peak_gflops else f"{threads} threads x {clock:.2f} GHz x FLOPs/cycle"
    print(f"\nPeak ({source}) and matmul roofline ({args.mm_size} x {args.mm_size} torch.mm, same threads):\n")
    print_table(
        (
            "dtype",
            "ISA (from flags)",
            "FLOPs/cycle/core",
            "peak GFLOP/s",
            "matmul GFLOP/s per CPU-s (wall)",
            "matmul / peak",
        ),
        (
            (
                name,
                p["isa"],
                f"{p['per_cycle']} ({p['reasoning']})",
                f"{p['peak']:.0f}",
                f"{p['mm']:.0f} ({p['mm_wall']:.0f})",
                f"{100 * utilisation(p['mm'], p['peak']):.0f} %",
            )
            for name, p in peaks.items()
        ),
    )

    torch.manual_seed(0)
    network = load_method("cimd", device).get_parsed_content("network").eval()
    image = torch.randn(1, 1, args.image_size, args.image_size)
    workloads = [network_call(network, image, args.rows, amp, args.repeats)]
    if amp is not None:
        workloads.append(network_call(network, image, args.rows, None, args.repeats))
    workloads.append(fast_sampler(network, image, args.rows, args.timed_steps, amp, args.repeats))
    if not args.no_training:
        workloads.append(training_iteration(args.image_size, args.train_batch, args.repeats))

    print(
        f"\nAchieved (FLOPs counted by FlopCounterMode; rate per CPU-second, per wall-second in brackets; "
        f"load {os.getloadavg()[0]:.2f}):\n"
    )
    rows = []
    for w in workloads:
        p = peaks[w.dtype]
        rows.append(
            (
                w.name,
                w.dtype,
                f"{w.flops / 1e9:.3g}",
                f"{1e3 * w.cpu_s:.1f} ({1e3 * w.wall_s:.1f})",
                f"{w.gflops_cpu:.1f} ({w.gflops_wall:.1f})",
                f"{100 * utilisation(w.gflops_cpu, p['peak']):.1f} %",
                f"{100 * utilisation(w.gflops_cpu, p['mm']):.1f} %",
                f"{100 * w.conv_share:.0f} %",
                f"{100 * dense_share(w.op_s):.0f} %",
            )
        )
    print_table(
        (
            "workload",
            "math",
            "GFLOP per run",
            "ms per run CPU (wall)",
            "GFLOP/s per CPU-s (wall)",
            "of peak",
            "of matmul roofline",
            "conv share of FLOPs",
            "conv/matmul share of CPU time",
        ),
        rows,
    )
    print("\nWhere the CPU time goes (one run per workload, share of the time in ATen operators; top 6):\n")
    print_table(
        ("workload", "math", "top operators"),
        (
            (
                w.name,
                w.dtype,
                ", ".join(f"{op} {100 * v / sum(w.op_s.values()):.0f} %" for op, v in list(w.op_s.items())[:6]),
            )
            for w in workloads
        ),
    )
    for name, p in peaks.items():
        if p["mm"] > p["peak"] and args.peak_gflops is None:
            implied = p["mm"] / (threads * p["per_cycle"])
            print(
                f"\nThe {name} matmul beats the computed peak: the cores ran at {implied:.2f} GHz or more, above the "
                f"{clock:.2f} GHz /proc/cpuinfo states (a VM reports the nominal clock; turbo is higher)."
            )
    sampler = next(w for w in workloads if w.name.startswith("fast sampler"))
    per_step = (sampler.flops / args.timed_steps) / 1e9
    print(
        f"\nfast sampler extrapolated to {FAST_STEPS} steps: ~{per_step * FAST_STEPS:.3g} GFLOP and "
        f"~{sampler.cpu_s * FAST_STEPS / args.timed_steps:.2f} CPU-s for {args.rows} masks (linear in the steps; "
        f"the condition encoding counted once per timed chain is included in the per-step figure)"
    )
    return {"cpu": info, "clock_ghz": clock, "threads": threads, "peaks": peaks, "workloads": workloads}


if __name__ == "__main__":
    main()
