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
    if warmup:
        fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
