"""benchmarks/hardware_limit.py: the peak from the CPU flags and clock (hand-computed cases) and a tiny run."""

from __future__ import annotations

import pytest

from benchmarks import hardware_limit as hl

CPUINFO = """processor\t: 0
model name\t: Test CPU @ 2.00GHz
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16

processor\t: 1
model name\t: Test CPU @ 2.00GHz
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16
"""


def test_cpuinfo_is_read_from_the_first_block_and_the_cpus_counted():
    info = hl.parse_cpuinfo(CPUINFO)
    assert info.model == "Test CPU @ 2.00GHz" and info.mhz == 2000.0 and info.logical_cpus == 2
    assert {"avx512f", "fma", "avx512_bf16"} <= info.flags


@pytest.mark.parametrize(
    ("flags", "dtype", "fma_units", "expected", "isa"),
    [
        ({"avx512f", "fma"}, "float32", 2, 64, "AVX-512 FMA"),  # 2 units x 16 lanes x 2
        ({"avx512f", "fma"}, "float32", 1, 32, "AVX-512 FMA"),  # 1 unit x 16 lanes x 2
        ({"avx2", "avx", "fma"}, "float32", 2, 32, "AVX2 FMA"),  # 2 x 8 x 2
        ({"avx", "sse2"}, "float32", 2, 16, "AVX"),  # add port + multiply port, 8 lanes each
        ({"sse2"}, "float32", 2, 8, "SSE2"),  # 2 ports x 4 lanes
        (set(), "float32", 2, 2, "scalar"),
        ({"avx512f", "fma", "avx512_bf16"}, "bfloat16", 2, 128, "AVX512-BF16"),  # 2 x 16 lanes x 2 products x 2
        ({"avx512f", "fma", "avx512_bf16", "amx_bf16", "amx_tile"}, "bfloat16", 2, 1024, "AMX-BF16"),
        ({"avx2", "fma"}, "bfloat16", 2, 32, "AVX2 FMA (no native bf16)"),  # bf16 computed in fp32: no gain
    ],
)
def test_flops_per_cycle_by_instruction_set(flags, dtype, fma_units, expected, isa):
    per = hl.flops_per_cycle(flags, dtype, fma_units)
    assert (per.flops, per.isa) == (expected, isa)
    assert per.reasoning


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="float16"):
        hl.flops_per_cycle({"avx512f", "fma"}, "float16")


def test_peak_and_utilisation_by_hand():
    # 2 cores x 2.6 GHz x 64 FLOPs/cycle = 332.8 GFLOP/s; 33.28 of it is 10 %
    assert hl.peak_gflops(2, 2.6, 64) == pytest.approx(332.8)
    assert hl.utilisation(33.28, 332.8) == pytest.approx(0.1)
    assert hl.utilisation(1.0, 0.0) == 0.0
    assert hl.gflops_per_second(2e9, 0.5) == pytest.approx(4.0)


def test_tiny_run_counts_flops_and_reports_against_the_peak(capsys):
    result = hl.main(["--image-size", "16", "--timed-steps", "1", "--repeats", "1", "--train-batch", "2",
                      "--mm-size", "128", "--peak-gflops", "100", "200"])  # fmt: skip
    out = capsys.readouterr().out
    assert "given (--peak-gflops)" in out and "| network call, 4 rows |" in out and "training iteration" in out
    assert result["peaks"]["float32"]["peak"] == 100 and result["peaks"]["bfloat16"]["peak"] == 200
    assert result["peaks"]["float32"]["mm"] > 0
    workloads = {w.name.split(",")[0] + w.dtype: w for w in result["workloads"]}
    for w in result["workloads"]:
        assert w.flops > 0 and w.cpu_s > 0 and w.wall_s > 0 and 0.5 < w.conv_share <= 1.0
    call = next(w for w in result["workloads"] if w.name.startswith("network call"))
    sampler = next(w for k, w in workloads.items() if k.startswith("fast sampler"))
    # a one-step chain of the fast sampler is one network call on the same 4 rows (+ the small encoding)
    assert sampler.flops == pytest.approx(call.flops, rel=0.05)
    train = next(w for w in result["workloads"] if w.name.startswith("training"))
    assert train.flops > call.flops / 2  # batch 2 forward + backward (about 3 forward passes) vs 4 rows forward
