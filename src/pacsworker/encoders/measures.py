"""Per-segment numbers for the SR: intensity statistics and the longest in-plane diameter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull, QhullError


@dataclass(frozen=True)
class Diameter:
    """The longest in-plane diameter of a segment: its slice, end points (row, column) and length (mm)."""

    slice_index: int
    start: tuple[float, float]
    end: tuple[float, float]
    length_mm: float


def _longest_chord(points: np.ndarray, row_mm: float, column_mm: float) -> tuple[int, int, float]:
    """Indices of the two points farthest apart (in mm) and their distance."""
    scaled = points * np.array([row_mm, column_mm])
    if len(scaled) > 3:
        try:
            hull = ConvexHull(scaled)
            candidates = hull.vertices  # the farthest pair lies on the convex hull
        except QhullError:  # collinear points
            candidates = np.arange(len(scaled))
    else:
        candidates = np.arange(len(scaled))
    chosen = scaled[candidates]
    distances = np.linalg.norm(chosen[:, None, :] - chosen[None, :, :], axis=-1)
    i, j = np.unravel_index(int(np.argmax(distances)), distances.shape)
    return int(candidates[i]), int(candidates[j]), float(distances[i, j])


def longest_diameter(mask: np.ndarray, row_mm: float, column_mm: float) -> Diameter | None:
    """The longest distance between two pixel centres of the mask within one slice, over all slices.

    ``mask`` is (slices, rows, columns); ``row_mm`` is the distance between rows (Pixel Spacing [0]).
    The farthest pair lies on the convex hull, and the hull of a slice's mask is the hull of each
    row's first and last mask pixel: only those are examined.
    """
    mask = mask.astype(bool, copy=False)
    in_row = mask.any(axis=2)  # (slices, rows)
    columns = mask.shape[2]
    first = np.argmax(mask, axis=2)
    last = columns - 1 - np.argmax(mask[:, :, ::-1], axis=2)
    best: Diameter | None = None
    for index in np.flatnonzero(in_row.any(axis=1)):
        rows = np.flatnonzero(in_row[index])
        points = np.unique(np.concatenate([
            np.stack([rows, first[index, rows]], axis=1), np.stack([rows, last[index, rows]], axis=1),
        ]), axis=0)
        if len(points) < 2:
            continue
        i, j, length = _longest_chord(points.astype(np.float64), row_mm, column_mm)
        if best is None or length > best.length_mm:
            best = Diameter(int(index), tuple(map(float, points[i])), tuple(map(float, points[j])), length)
    return best
