"""Per-segment numbers for the SR: intensity statistics and the longest in-plane diameter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull, QhullError
from skimage.segmentation import find_boundaries


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
    """
    best: Diameter | None = None
    for index in np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1)):
        plane = mask[index]
        edge = np.argwhere(find_boundaries(plane, mode="inner") & plane)
        if len(edge) == 0:
            edge = np.argwhere(plane)
        if len(edge) == 1:
            continue
        i, j, length = _longest_chord(edge.astype(np.float64), row_mm, column_mm)
        if best is None or length > best.length_mm:
            best = Diameter(int(index), tuple(map(float, edge[i])), tuple(map(float, edge[j])), length)
    return best
