"""Rasterising annotation contours into binary masks (scikit-image).

Boundary convention (LIDC ``edgeMap``): the contour points are pixel centres *on* the outline,
and the LIDC readers drew that outline just outside the structure. So by default the outline is
not part of the mask (pylidc's default, ``include_contour_points=False``):

* an inclusion contour gives the pixels strictly inside its polygon: every pixel whose centre is
  inside the polygon, minus the pixels of the closed outline itself (drawn as 8-connected lines
  between consecutive points; LIDC outlines are 8-connected chains, so these are the points).
  An outline pixel is never nodule, even where it lies inside another inclusion contour of the
  same reader and slice;
* an exclusion contour (a hole) removes its interior *and* its outline: the hole's outline also
  lies outside the nodule tissue.

With ``include_outline=True`` (``ambiseg prepare lidc --include-outline``) the outline belongs to
the structure instead: an inclusion contour adds its outline pixels, and an exclusion contour
removes only the pixels strictly inside its outline (its outline stays in the nodule).
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
    """Pixels whose centre is inside (or on the edge of) the polygon ``points`` (P x 2 (row, column))."""
    points = np.asarray(points, dtype=float)
    if len(points) < 3:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return polygon(points[:, 0], points[:, 1], shape=tuple(shape))


def _region(points: np.ndarray, shape: Sequence[int], with_outline: bool) -> np.ndarray:
    """H x W bool: the polygon's pixels, with or without its outline pixels."""
    region = np.zeros(tuple(shape), dtype=bool)
    region[fill_contour(points, shape)] = True
    region[outline_pixels(points, shape)] = with_outline
    return region


def rasterise_contours(
    contours: Iterable[tuple[np.ndarray, bool]], shape: Sequence[int], include_outline: bool = False
) -> np.ndarray:
    """One binary mask from inclusion outlines and exclusion holes.

    Args:
        contours: ``(points, inclusion)`` pairs; ``points`` is P x 2 (row, column) in the mask's
            pixel coordinates (may be fractional and may lie partly outside the mask).
        shape: (H, W) of the mask.
        include_outline: count the outline pixels as part of the structure (see the module
            docstring); False (default) keeps only the pixels strictly inside each outline.

    Returns:
        H x W uint8 mask. Default: union of the inclusion polygons minus all their outlines,
        minus the exclusion polygons with their outlines. With ``include_outline``: union of the inclusion
        polygons with their outlines, minus the strict interiors of the exclusion polygons.
    """
    contours = list(contours)
    mask = np.zeros(tuple(shape), dtype=bool)
    for points, inclusion in contours:
        if inclusion:
            mask |= _region(points, shape, with_outline=True)
    if not include_outline:  # every outline lies outside the nodule, even inside another contour
        for points, inclusion in contours:
            if inclusion:
                mask[outline_pixels(points, shape)] = False
    for points, inclusion in contours:
        if not inclusion:
            mask &= ~_region(points, shape, with_outline=not include_outline)
    return mask.astype(np.uint8)
