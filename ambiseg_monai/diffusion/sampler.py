"""The reverse-diffusion loop: network + scheduler -> masks, with per-sample randomness.

Every sampled mask ("row") owns a ``torch.Generator`` seeded from (seed, image key, sample index).
Its starting noise x_T and the noise of every step are drawn from that generator only, so a mask
does not depend on which other masks share its batch: sampling the N masks of an image in one batch,
one at a time (as the official CIMD code does), or in chunks gives identical masks.

The loop uses only the sampling side of the scheduler protocol
(:class:`~ambiseg_monai.diffusion.protocols.SamplingScheduler`: ``set_timesteps``, ``timesteps``,
``step(..., noise=...)``); the per-sample noise is the ``noise`` argument of ``step``.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "sample_seed",
    "make_generators",
    "draw_noise",
    "repeat_rows",
    "take_rows",
    "index_rows",
    "autocast_dtype_from_name",
    "reverse_diffusion",
]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"float16"`` (or the dtype itself) -> the dtype; None -> None (float32 network calls)."""
    if name is None or isinstance(name, torch.dtype) and name in AUTOCAST_DTYPES.values():
        return name
    if isinstance(name, str) and name.removeprefix("torch.") in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[name.removeprefix("torch.")]
    raise ValueError(f"autocast_dtype must be one of {sorted(AUTOCAST_DTYPES)} or None, got {name!r}.")


def sample_seed(seed: int, image_key: int | str, sample_index: int) -> int:
    """A 63-bit seed for one (image, sample) pair; stable across runs, platforms and batchings.

    Args:
        seed: the user's seed.
        image_key: the image's identity: a non-negative int (position in the dataset) or a string
            (a case id, hashed with CRC32).
        sample_index: index n of the sample among the image's N samples.
    """
    key = zlib.crc32(image_key.encode("utf-8")) if isinstance(image_key, str) else int(image_key)
    if seed < 0 or key < 0 or sample_index < 0:
        raise ValueError(f"seed, image key and sample index must be non-negative, got {seed}, {key}, {sample_index}.")
    state = np.random.SeedSequence([int(seed), key, int(sample_index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def make_generators(seed: int, image_keys: Sequence[int | str], num_samples: int) -> list[torch.Generator]:
    """CPU generators for B images x N samples, image-major (row b * N + n)."""
    generators = []
    for key in image_keys:
        for n in range(num_samples):
            generator = torch.Generator(device="cpu")
            generator.manual_seed(sample_seed(seed, key, n))
            generators.append(generator)
    return generators


def _map_rows(value: Any, select: Callable[[torch.Tensor], torch.Tensor], what: str) -> Any:
    """``select`` applied to a tensor or to every tensor in a (nested) tuple/list/dict; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return select(value)
    if isinstance(value, dict):
        return {k: _map_rows(v, select, what) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map_rows(v, select, what) for v in value)
    raise TypeError(f"cannot {what} batch rows of a {type(value).__name__}")


def repeat_rows(value: Any, repeats: int) -> Any:
    """Repeat every batch row ``repeats`` times (image-major) in a tensor or a tuple/list/dict of tensors."""
    return _map_rows(value, lambda t: t.repeat_interleave(repeats, dim=0), "repeat")


def take_rows(value: Any, rows: slice) -> Any:
    """Rows ``rows`` of a tensor or of every tensor in a tuple/list/dict."""
    return _map_rows(value, lambda t: t[rows], "select")


def index_rows(value: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` (a 1-D long tensor) of a tensor or of every tensor in a tuple/list/dict.

    The N-sample inferer selects each chunk's conditions this way (``index`` = the image of each row),
    so the repeated condition of all B x N rows is never held at once.
    """
    return _map_rows(value, lambda t: t.index_select(0, index.to(t.device)), "select")


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Standard-normal rows x ``shape`` noise, row i drawn from ``generators[i]`` on the CPU, on ``like``'s device.

    Drawing on the CPU makes a mask's noise identical on every device and batching. Each row is
    drawn straight into its slice of one buffer (no stacking copy); for a CUDA target the buffer is
    pinned and copied asynchronously, so the host does not wait for the device's queued work (a
    pageable copy would block until the previous step's network call has finished).
    """
    pinned = like.device.type == "cuda"
    buffer = torch.empty((len(generators), *shape), pin_memory=pinned)
    for row, generator in zip(buffer, generators, strict=True):
        torch.randn(tuple(shape), generator=generator, out=row)
    return buffer.to(device=like.device, dtype=like.dtype, non_blocking=pinned)


@torch.no_grad()
def reverse_diffusion(
    network: Callable[..., torch.Tensor],
    scheduler,
    cond: Any,
    sample_shape: Sequence[int],
    generators: Sequence[torch.Generator],
    class_labels: torch.Tensor | None = None,
    num_inference_steps: int | None = None,
    progress: bool = False,
    reference: torch.Tensor | None = None,
    autocast_dtype: str | torch.dtype | None = None,
) -> torch.Tensor:
    """Run the reverse chain for ``len(generators)`` rows and return the final x_0 estimate.

    Per step the loop does one network call, one scheduler step and one host-to-device copy (the
    rows' noise); it never reads a device value back, so on a GPU the host runs ahead of the device.

    Args:
        network: ``network(x_t, timesteps, cond=..., class_labels=...) -> B x C' x H x W``.
        scheduler: an object following the scheduler protocol.
        cond: the rows' condition (already encoded and repeated per row), or None.
        sample_shape: C x H x W of one mask.
        generators: one generator per row.
        class_labels: (rows,) integer labels, or None.
        num_inference_steps: respaced number of steps (``scheduler.set_timesteps``); None keeps
            the scheduler's current timesteps.
        progress: show a tqdm bar over the steps.
        reference: a tensor whose device and dtype the samples take (default: float32 on CPU).
        autocast_dtype: run the network calls under ``torch.autocast`` on the samples' device with
            this dtype ("bfloat16": CPUs with native bf16 and GPUs; "float16": GPUs); the scheduler
            arithmetic stays in the samples' dtype. None: no autocast here (an enclosing autocast,
            e.g. an evaluator's ``amp``, still applies).

    Returns:
        rows x C x H x W tensor of x_0 in the diffusion range ([-1, 1] for masks).
    """
    like = reference if reference is not None else torch.zeros(())
    like = like.float() if not like.is_floating_point() else like
    if num_inference_steps is not None:
        scheduler.set_timesteps(int(num_inference_steps))  # timesteps stay on the CPU: the loop needs their values
    rows = len(generators)
    timestep_dtype = scheduler.timesteps.dtype
    dtype = autocast_dtype_from_name(autocast_dtype)
    mixed_precision = torch.autocast(like.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    x = draw_noise(generators, sample_shape, like)
    # Python numbers: one read of the timesteps per chain, not a device read (int(t)) per step
    for t in tqdm(scheduler.timesteps.tolist(), desc="sampling", disable=not progress, leave=False):
        t_batch = torch.full((rows,), t, dtype=timestep_dtype, device=like.device)
        with mixed_precision:
            model_output = network(x, t_batch, cond=cond, class_labels=class_labels)
        x, _ = scheduler.step(model_output.to(x.dtype), t, x, noise=draw_noise(generators, sample_shape, like))
    return x
