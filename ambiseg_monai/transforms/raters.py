"""Rater-stack transforms: the label strategies and rater padding, array and dictionary (``...d``) versions.

Shapes: a rater stack is R x H x W (one binary mask per rater, R may vary between items);
a training target is 1 x H x W. Random transforms subclass ``RandomizableTransform`` so
``CacheDataset`` caches everything before them and ``Compose.set_random_state`` seeds them.

Label strategies (which target a method trains on):

==========================  ==========================================  ======================
strategy                    transform                                   used by
==========================  ==========================================  ======================
one random rater            :class:`SelectRandomRaterd`                 CIMD, AmbDiffSeg, PUNet
mean (soft) label           :class:`MeanRatersd`                        DDPM-det-Seg, soft label
random consensus level      :class:`RandomConsensusLeveld`              consensus diffusion
rater id (conditioning)     :class:`SelectRaterd` (``rater=None``)      "annotator" ablation
==========================  ==========================================  ======================
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform

__all__ = [
    "SelectRandomRater",
    "SelectRandomRaterd",
    "SelectRater",
    "SelectRaterd",
    "MeanRaters",
    "MeanRatersd",
    "ConsensusLevel",
    "RandomConsensusLevel",
    "RandomConsensusLeveld",
    "PadRaters",
    "PadRatersd",
]

ArrayLike = torch.Tensor | np.ndarray


def _check_stack(raters: ArrayLike, name: str) -> None:
    if raters.ndim != 3 or raters.shape[0] < 1:
        raise ValueError(f"{name}: expected a rater stack R x H x W with R >= 1, got shape {tuple(raters.shape)}")


def _real_rater_indices(num_channels: int, rater_mask: ArrayLike | None) -> np.ndarray:
    """Indices of the channels that hold a real rater (all, unless a padding mask says otherwise)."""
    if rater_mask is None:
        return np.arange(num_channels)
    indices = np.flatnonzero(np.asarray(rater_mask, dtype=bool))
    if indices.size == 0:
        raise ValueError("rater_mask marks no rater as present")
    return indices


# --------------------------------------------------------------------------------------------
# label strategies
# --------------------------------------------------------------------------------------------
class SelectRandomRater(RandomizableTransform):
    """Pick one rater's mask at random on every call: R x H x W -> 1 x H x W.

    ``rater_mask`` (bool R), when given, restricts the choice to real (non-padding) raters.
    The chosen index is kept in :attr:`last_rater`.
    """

    def __init__(self) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.last_rater = 0

    def randomize(self, num_channels: int, rater_mask: ArrayLike | None = None) -> None:
        self.last_rater = int(self.R.choice(_real_rater_indices(num_channels, rater_mask)))

    def __call__(self, raters: ArrayLike, rater_mask: ArrayLike | None = None, randomize: bool = True) -> ArrayLike:
        _check_stack(raters, type(self).__name__)
        if randomize:
            self.randomize(raters.shape[0], rater_mask)
        return raters[self.last_rater : self.last_rater + 1]


class SelectRater(Transform):
    """Pick the mask of a given rater id: R x H x W -> 1 x H x W."""

    def __init__(self, rater: int) -> None:
        self.rater = int(rater)

    def __call__(self, raters: ArrayLike) -> ArrayLike:
        _check_stack(raters, type(self).__name__)
        if not 0 <= self.rater < raters.shape[0]:
            raise ValueError(f"rater id {self.rater} out of range for a stack of {raters.shape[0]} raters")
        return raters[self.rater : self.rater + 1]


class MeanRaters(Transform):
    """The soft label: the fraction of raters marking each pixel, R x H x W -> 1 x H x W in [0, 1]."""

    def __call__(self, raters: ArrayLike, rater_mask: ArrayLike | None = None) -> ArrayLike:
        _check_stack(raters, type(self).__name__)
        indices = _real_rater_indices(raters.shape[0], rater_mask)
        selected = raters[torch.as_tensor(indices) if isinstance(raters, torch.Tensor) else indices]
        return (
            selected.float().mean(0, keepdim=True)
            if isinstance(selected, torch.Tensor)
            else (selected.astype(np.float32).mean(0, keepdims=True))
        )


class ConsensusLevel(Transform):
    """Consensus map at level ``c``: ``M^c = 1[sum_i A_i >= c]``, R x H x W -> 1 x H x W in {0, 1}.

    ``c = 1`` is the union of the raters, ``c = R`` their intersection. ``level`` may be passed
    per call to override the constructor's.
    """

    def __init__(self, level: int = 1) -> None:
        self.level = int(level)

    def __call__(self, raters: ArrayLike, level: int | None = None) -> ArrayLike:
        _check_stack(raters, type(self).__name__)
        level = self.level if level is None else int(level)
        if not 1 <= level <= raters.shape[0]:
            raise ValueError(f"consensus level {level} out of range 1..{raters.shape[0]}")
        votes = raters.sum(0, keepdims=True) if isinstance(raters, np.ndarray) else raters.sum(0, keepdim=True)
        consensus = votes >= level
        return consensus.astype(np.float32) if isinstance(consensus, np.ndarray) else consensus.float()


class RandomConsensusLevel(RandomizableTransform):
    """Consensus map at a level drawn uniformly from 1..R (R: this item's rater count).

    The drawn level is kept in :attr:`last_level`.
    """

    def __init__(self) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.last_level = 1
        self.consensus = ConsensusLevel()

    def randomize(self, num_raters: int) -> None:
        self.last_level = int(self.R.randint(1, num_raters + 1))

    def __call__(self, raters: ArrayLike, num_raters: int | None = None, randomize: bool = True) -> ArrayLike:
        _check_stack(raters, type(self).__name__)
        num_raters = raters.shape[0] if num_raters is None else int(num_raters)
        if randomize:
            self.randomize(num_raters)
        return self.consensus(raters, self.last_level)


class PadRaters(Transform):
    """Pad a rater stack with empty masks to ``num_raters`` channels so variable rater counts batch.

    Returns the padded stack (``num_raters`` x H x W) and a bool mask of length ``num_raters``
    marking the real raters. Padding masks are not opinions: metrics take the mask into account.
    """

    def __init__(self, num_raters: int) -> None:
        self.num_raters = int(num_raters)

    def __call__(self, raters: ArrayLike) -> tuple[ArrayLike, torch.Tensor]:
        _check_stack(raters, type(self).__name__)
        count = raters.shape[0]
        if count > self.num_raters:
            raise ValueError(f"stack has {count} raters, more than the padded size {self.num_raters}")
        mask = torch.arange(self.num_raters) < count
        if count == self.num_raters:
            return raters, mask
        if isinstance(raters, torch.Tensor):
            padding = raters.new_zeros((self.num_raters - count, *raters.shape[1:]))
            return torch.cat([raters, padding], 0), mask
        empty = np.zeros((self.num_raters - count, *raters.shape[1:]), dtype=raters.dtype)
        return np.concatenate([raters, empty], 0), mask


# --------------------------------------------------------------------------------------------
# dictionary versions
# --------------------------------------------------------------------------------------------
class _LabelStrategyd(MapTransform):
    """Shared plumbing: read the rater stack from ``keys``, write the target to ``output_key``."""

    def __init__(self, keys: KeysCollection, output_key: str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly one rater-stack key, got {self.keys}")
        self.output_key = output_key


class SelectRandomRaterd(_LabelStrategyd, RandomizableTransform):
    """Dictionary version of :class:`SelectRandomRater`.

    Writes the chosen rater's mask to ``output_key`` (default ``target``) and, if
    ``rater_id_key`` is set, the chosen rater index. Honours ``rater_mask_key`` when present.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        output_key: str = "target",
        rater_id_key: str | None = None,
        rater_mask_key: str = "rater_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        _LabelStrategyd.__init__(self, keys, output_key, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.rater_id_key = rater_id_key
        self.rater_mask_key = rater_mask_key
        self.last_rater = 0

    def randomize(self, num_channels: int, rater_mask: ArrayLike | None = None) -> None:
        self.last_rater = int(self.R.choice(_real_rater_indices(num_channels, rater_mask)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            _check_stack(d[key], type(self).__name__)
            self.randomize(d[key].shape[0], d.get(self.rater_mask_key))
            d[self.output_key] = SelectRater(self.last_rater)(d[key])
            if self.rater_id_key is not None:
                d[self.rater_id_key] = self.last_rater
        return d


class SelectRaterd(SelectRandomRaterd):
    """Select a rater by id for rater-conditioned training ("annotator" variants).

    With ``rater=None`` the id is drawn at random (like :class:`SelectRandomRaterd`) and written
    to ``rater_id_key`` (default ``class_label``) so the network can be conditioned on it; with
    a fixed ``rater`` that rater's mask is taken every time.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        rater: int | None = None,
        output_key: str = "target",
        rater_id_key: str | None = "class_label",
        rater_mask_key: str = "rater_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_key, rater_id_key, rater_mask_key, allow_missing_keys)
        self.rater = rater

    def randomize(self, num_channels: int, rater_mask: ArrayLike | None = None) -> None:
        if self.rater is None:
            super().randomize(num_channels, rater_mask)
        else:
            self.last_rater = int(self.rater)


class MeanRatersd(_LabelStrategyd):
    """Dictionary version of :class:`MeanRaters` (honours ``rater_mask_key`` when present)."""

    def __init__(
        self,
        keys: KeysCollection = "label",
        output_key: str = "target",
        rater_mask_key: str = "rater_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, output_key, allow_missing_keys)
        self.mean = MeanRaters()
        self.rater_mask_key = rater_mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.mean(d[key], d.get(self.rater_mask_key))
        return d


class RandomConsensusLeveld(_LabelStrategyd, RandomizableTransform):
    """Dictionary version of :class:`RandomConsensusLevel`.

    Writes ``M^c`` to ``output_key`` and the level to ``level_key`` as the 0-based embedding
    index ``c - 1`` (``DiffusionModelUNet(num_class_embeds=C)`` expects labels in [0, C)).
    The level is drawn from 1..R with R the item's rater count (``num_raters_key``, or the
    number of real raters in ``rater_mask_key``, or the stack size).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        output_key: str = "target",
        level_key: str = "class_label",
        num_raters_key: str = "num_raters",
        rater_mask_key: str = "rater_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        _LabelStrategyd.__init__(self, keys, output_key, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.consensus = ConsensusLevel()
        self.level_key = level_key
        self.num_raters_key = num_raters_key
        self.rater_mask_key = rater_mask_key
        self.last_level = 1

    def randomize(self, num_raters: int) -> None:
        self.last_level = int(self.R.randint(1, num_raters + 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            raters = d[key]
            num_raters = d.get(self.num_raters_key)
            if self.rater_mask_key in d:
                indices = _real_rater_indices(raters.shape[0], d[self.rater_mask_key])
                raters = raters[torch.as_tensor(indices) if isinstance(raters, torch.Tensor) else indices]
                num_raters = len(indices)
            _check_stack(raters, type(self).__name__)
            self.randomize(raters.shape[0] if num_raters is None else int(num_raters))
            d[self.output_key] = self.consensus(raters, self.last_level)
            d[self.level_key] = self.last_level - 1
        return d


class PadRatersd(MapTransform):
    """Dictionary version of :class:`PadRaters`: pads ``keys`` and writes the bool rater mask
    (length ``num_raters``) to ``mask_key`` (default ``rater_mask``)."""

    def __init__(
        self,
        keys: KeysCollection = "label",
        num_raters: int = 4,
        mask_key: str = "rater_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pad = PadRaters(num_raters)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[self.mask_key] = self.pad(d[key])
        return d
