"""Rasterising annotation contours into binary masks (scikit-image).

Boundary convention (LIDC ``edgeMap``): the contour points are pixel centres *on* the outline, and
the outline belongs to the structure. An inclusion contour therefore yields every pixel whose
centre lies inside the polygon or on its edges, plus the pixels of the closed outline itself
(drawn as 8-connected lines between consecutive points); an exclusion contour (a hole) removes
only the pixels strictly inside its outline, so the hole's outline stays part of the nodule.
This is the convention of pylidc's masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from skimage.draw import line, polygon

__all__ = ["outline_pixels", "fill_contour", "rasterise_contours"]


def _inside(rows: np.ndarray, columns: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return (rows >= 0) & (rows < shape[0]) & (columns >= 0) & (columns < shape[1])


def outline_pixels(points: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the closed outline through ``points`` (P x 2 (row, column)), clipped to ``shape``."""
    vertices = np.rint(np.asarray(points, dtype=float)).astype(np.int64)
    if len(vertices) == 1:
        rows, columns = vertices[:, 0], vertices[:, 1]
    else:
        segments = [line(*vertices[k], *vertices[(k + 1) % len(vertices)]) for k in range(len(vertices))]
        rows = np.concatenate([s[0] for s in segments])
        columns = np.concatenate([s[1] for s in segments])
    keep = _inside(rows, columns, shape)
    return rows[keep], columns[keep]


def fill_contour(points: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose centre is inside or on the polygon ``points`` (P x 2 (row, column))."""
    points = np.asarray(points, dtype=float)
    if len(points) < 3:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return polygon(points[:, 0], points[:, 1], shape=tuple(shape))


def rasterise_contours(
    contours: Iterable[tuple[np.ndarray, bool]], shape: Sequence[int]
) -> np.ndarray:
    """One binary mask from inclusion outlines and exclusion holes.

    Args:
        contours: ``(points, inclusion)`` pairs; ``points`` is P x 2 (row, column) in the mask's
            pixel coordinates (may be fractional and may lie partly outside the mask).
        shape: (H, W) of the mask.

    Returns:
        H x W uint8 mask: union of the inclusion polygons with their outlines, minus the strict
        interiors of the exclusion polygons.
    """
    contours = list(contours)
    mask = np.zeros(tuple(shape), dtype=bool)
    for points, inclusion in contours:
        if inclusion:
            mask[fill_contour(points, shape)] = True
            mask[outline_pixels(points, shape)] = True
    for points, inclusion in contours:
        if not inclusion:
            hole = np.zeros(tuple(shape), dtype=bool)
            hole[fill_contour(points, shape)] = True
            hole[outline_pixels(points, shape)] = False
            mask &= ~hole
    return mask.astype(np.uint8)
