"""Wall-clock timing shared by the benchmark scripts (CUDA work is synchronised around each run)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = False) -> float:
    """Best of ``repeats`` timed calls of ``fn`` (the least disturbed by other processes on a shared machine).

    ``warmup`` makes one untimed call first (allocator, kernel selection).
    """
    return best_wall_and_cpu_seconds(fn, device, repeats, warmup)[0]


def best_wall_and_cpu_seconds(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = False
) -> tuple[float, float]:
    """Best wall-clock and best CPU seconds (this process, all its threads) of ``repeats`` calls of ``fn``.

    On a machine shared with other processes the wall clock also counts the time this process waited
    for a core; its CPU time does not, so FLOP/s per CPU-second is the rate the cores actually reached
    while running it. ``warmup`` makes one untimed call first.
    """
    if warmup:
        fn()
    best_wall = best_cpu = float("inf")
    for _ in range(max(1, repeats)):
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu
