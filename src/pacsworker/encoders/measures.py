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


DIRECTIONS = 32
# a set's diameter D has some sampled direction within 90 / DIRECTIONS degrees of it, where the
# set's width is at least D * cos(that angle): so D <= (largest sampled width) / cos(90 / DIRECTIONS)
BOUND_FACTOR = 1.0 / np.cos(np.pi / (2 * DIRECTIONS)) + 1e-9


def _diameter_bounds(first: np.ndarray, last: np.ndarray, in_row: np.ndarray, row_mm: float, column_mm: float) -> np.ndarray:
    """Per slice, an upper bound (mm) of the longest chord between its row extremes: the largest
    width over DIRECTIONS evenly spaced directions, over the cosine of half their spacing."""
    rows = np.arange(first.shape[1], dtype=np.float64)[None, :] * row_mm
    widest = np.zeros(first.shape[0])
    for angle in np.arange(DIRECTIONS) * np.pi / DIRECTIONS:
        along_rows, along_columns = np.cos(angle), np.sin(angle)
        a = rows * along_rows + first * column_mm * along_columns
        b = rows * along_rows + last * column_mm * along_columns
        high = np.where(in_row, np.maximum(a, b), -np.inf).max(axis=1)
        low = np.where(in_row, np.minimum(a, b), np.inf).min(axis=1)
        widest = np.maximum(widest, high - low)
    return widest * BOUND_FACTOR


def longest_diameter(mask: np.ndarray, row_mm: float, column_mm: float) -> Diameter | None:
    """The longest distance between two pixel centres of the mask within one slice, over all slices.

    ``mask`` is (slices, rows, columns); ``row_mm`` is the distance between rows (Pixel Spacing [0]).
    The farthest pair lies on the convex hull, and the hull of a slice's mask is the hull of each
    row's first and last mask pixel: only those are examined. Slices are visited from the largest
    upper bound of their diameter down; once a slice's bound cannot beat the best length found,
    the rest cannot either.
    """
    mask = mask.astype(bool, copy=False)
    in_row: np.ndarray = np.any(mask, axis=2)  # (slices, rows)
    columns = mask.shape[2]
    first = np.argmax(mask, axis=2)
    last = columns - 1 - np.argmax(mask[:, :, ::-1], axis=2)
    occupied = np.flatnonzero(in_row.any(axis=1))
    bounds = _diameter_bounds(first[occupied], last[occupied], in_row[occupied], row_mm, column_mm)
    best: Diameter | None = None
    for order in np.argsort(bounds)[::-1]:
        index = occupied[order]
        if best is not None and bounds[order] <= best.length_mm:
            break
        rows = np.flatnonzero(in_row[index])
        starts, ends = first[index, rows], last[index, rows]
        wide = ends != starts  # a row with one pixel contributes one point
        points = np.concatenate([np.stack([rows, starts], axis=1), np.stack([rows[wide], ends[wide]], axis=1)])
        if len(points) < 2:
            continue
        i, j, length = _longest_chord(points.astype(np.float64), row_mm, column_mm)
        if best is None or length > best.length_mm:
            (start_row, start_column), (end_row, end_column) = points[i], points[j]
            best = Diameter(int(index), (float(start_row), float(start_column)), (float(end_row), float(end_column)), length)
    return best
