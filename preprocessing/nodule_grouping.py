"""Grouping the radiologists' marks of the same physical nodule.

LIDC readers marked nodules independently, so the XML does not say which marks of different
readers are the same nodule. Two marks are *close* when the smallest distance between their
contour points, in millimetres (row, column scaled by the pixel spacing; z as given), is at most
a tolerance (by default the slice spacing, as in pylidc's ``cluster_annotations``).

Grouping is single-linkage with a cannot-link constraint: pairs are merged in order of increasing
distance, but never when the two groups already hold a mark of the same reader (one reader marks
a nodule once). Unlike a plain connected-components grouping this cannot put two of one reader's
nodules into one group, so no tolerance shrinking is needed. The result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.distance import cdist

__all__ = ["mark_distance", "group_marks"]


def mark_distance(points_a: np.ndarray, points_b: np.ndarray) -> float:
    """Smallest Euclidean distance between two P x 3 point sets (mm)."""
    return float(cdist(points_a, points_b).min())


def group_marks(points: Sequence[np.ndarray], readers: Sequence[int], tolerance: float) -> list[list[int]]:
    """Group marks that outline the same nodule.

    Args:
        points: per mark, a P x 3 array of contour points in mm (any consistent frame).
        readers: per mark, the reader who made it.
        tolerance: largest point-to-point distance (mm) at which two marks are the same nodule.

    Returns:
        Groups of mark indices, each with at most one mark per reader, ordered by their mean
        z (third coordinate) and then by their first mark's index.
    """
    count = len(points)
    if len(readers) != count:
        raise ValueError(f"{count} marks but {len(readers)} reader indices")
    parent = list(range(count))
    members: dict[int, set[int]] = {i: {readers[i]} for i in range(count)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = []
    for i in range(count):
        for j in range(i + 1, count):
            if readers[i] == readers[j]:
                continue
            distance = mark_distance(points[i], points[j])
            if distance <= tolerance:
                pairs.append((distance, i, j))
    for _, i, j in sorted(pairs):
        root_i, root_j = find(i), find(j)
        if root_i == root_j or members[root_i] & members[root_j]:
            continue  # already together, or the same reader would appear twice
        parent[root_j] = root_i
        members[root_i] |= members.pop(root_j)

    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (float(np.mean([points[i][:, 2].mean() for i in g])), g[0]))
