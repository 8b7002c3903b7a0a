"""A ``Compose`` for training pipelines whose items need no metadata.

MONAI's transforms keep each tensor's metadata and the list of operations applied to it (``MetaTensor``),
so that a prediction can be inverted and saved in the image's space. A training item needs neither: the
bundles' training pipelines end in ``EnsureTyped(track_meta=False)``. Until then the tracking is pure cost,
and on the 32 x 32 demo it dominated the loader (docs/benchmarks.md, "Training throughput"): the flips and
rotations of ``augment`` took 1.7 ms per item with tracking and 0.45 ms without, and ``CacheDataset`` deep-copies
every cached ``MetaTensor`` before the random transforms run.
"""

from __future__ import annotations

import threading
from typing import Any

from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose

__all__ = ["UntrackedCompose"]

# MONAI's switch is one process-wide flag; the count lets concurrent calls (CacheDataset fills its cache
# from a thread pool when num_workers > 0) overlap without one of them switching tracking back on early.
_lock = threading.Lock()
_active = 0
_saved = True


class UntrackedCompose(Compose):
    """``Compose`` that runs its transforms with metadata tracking off (``monai.data.set_track_meta(False)``).

    The transforms then return plain ``torch.Tensor`` s instead of ``MetaTensor`` s, with the same values and
    the same random draws. Tracking is restored when the call returns; while any call is running it is off
    for the whole process, so use it for training items only (whose metadata is dropped anyway), not for
    inference pipelines whose outputs are inverted or saved. ``CacheDataset`` runs both the cached part and
    the random part through ``__call__``, so its cache holds plain tensors too (cheap to copy).
    """

    def __call__(self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False,
                 lazy: bool | None = None) -> Any:  # fmt: skip
        global _active, _saved
        with _lock:
            if _active == 0:
                _saved = get_track_meta()
                set_track_meta(False)
            _active += 1
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        finally:
            with _lock:
                _active -= 1
                if _active == 0:
                    set_track_meta(_saved)
