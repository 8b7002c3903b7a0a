"""Device and precision choices the bundle configs make: where the network runs, AMP, CPU bfloat16."""

from __future__ import annotations

import torch

__all__ = ["network_to_device", "use_amp", "cpu_has_native_bf16", "cpu_autocast_dtype"]


def network_to_device(network: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Move a network to ``device``; on CUDA also switch it to channels-last memory."""
    device = torch.device(device)
    network = network.to(device)
    if device.type == "cuda":
        # Module.to accepts memory_format (documented), which torch's overloads leave out
        network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return network


def use_amp(device: str | torch.device, requested: bool = True) -> bool:
    """The engines' ``amp`` flag (fp16 autocast + GradScaler): MONAI's engines implement it for CUDA only."""
    return bool(requested) and torch.device(device).type == "cuda"


def cpu_has_native_bf16() -> bool:
    """True on a CPU whose oneDNN kernels run bfloat16 natively (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_autocast_dtype(device: str | torch.device, requested: bool = True) -> str | None:
    """``"bfloat16"`` on a CPU with native bf16 when mixed precision is requested, else None.

    The bundles pass it to their training and sampling inferers as ``autocast_dtype``: MONAI's
    engines autocast on CUDA only (``amp``), and on such a CPU bf16 network calls train about
    2x faster with no measured loss in sample quality (docs/benchmarks.md). CPUs without native
    bf16 emulate it slower than float32, so they keep float32.
    """
    return "bfloat16" if requested and torch.device(device).type == "cpu" and cpu_has_native_bf16() else None
