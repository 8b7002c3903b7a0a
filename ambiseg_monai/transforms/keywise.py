"""The dictionary version of an array transform, written once.

MONAI pairs each array transform ``X`` with a dictionary transform ``Xd`` that applies it to the value
of each of its ``keys``. :class:`KeywiseTransformd` is that ``Xd``: a subclass only builds its array
transform and passes it to ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["KeywiseTransformd"]


class KeywiseTransformd(MapTransform):
    """Apply ``transform`` to ``data[key]`` for each of ``keys`` (missing keys: see ``allow_missing_keys``).

    Args:
        keys: the item keys to transform.
        transform: the array transform, called with the key's value; its result replaces the value.
        allow_missing_keys: skip keys that the item lacks instead of raising.
    """

    def __init__(self, keys: KeysCollection, transform: Callable[[Any], Any], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
