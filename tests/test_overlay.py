"""The overlay PNG of ``pacsworker run``: planes as radiology viewers show them, whatever plane the
series was acquired in, named, with patient directions at their edges and a legend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pacsworker.worker.export import BOX_PALETTE, render_overlay, write_overlay_png
from pacsworker.worker.outputs import Box, SegmentSpec
from pacsworker.worker.series import Series
from pacsworker.worker.volume import load_series

MARKER = SegmentSpec(1, "Marker", color=(255, 0, 0))
SERIES = {
    "axial CT": "ct02_philips_ingenuity_headphantom_5mm",
    "sagittal MR": "mr06_siemens_prisma_xa30_t1_enhanced_multiframe",
}


def _marker_towards_right_anterior_superior(series: Series) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A small cube halfway from the volume's centre to its right, anterior and superior edges,
    placed by patient coordinates (LPS: right is -x, anterior -y, superior +z)."""
    shape = np.array(series.pixels.shape)
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = (series.affine @ corners.T).T[:, :3]
    low, high = world.min(axis=0), world.max(axis=0)
    target = low + np.array([0.25, 0.25, 0.75]) * (high - low)
    index = np.linalg.solve(series.affine, [*target, 1.0])[:3].round().astype(int).clip(0, shape - 1)
    labels = np.zeros(series.pixels.shape, dtype=np.uint8)
    half = [max(1, round(6.0 / spacing)) for spacing in series.spacing]
    labels[tuple(slice(max(0, i - h), i + h + 1) for i, h in zip(index, half, strict=True))] = MARKER.label
    return labels, tuple(int(v) for v in index)


@pytest.mark.parametrize("acquired", list(SERIES))
def test_each_plane_shows_superior_up_and_the_patients_right_or_front_on_the_left(dicom_dir, tmp_path, acquired):
    series = Series(load_series(sorted((dicom_dir / SERIES[acquired]).glob("*"))))
    labels, (s, r, c) = _marker_towards_right_anterior_superior(series)
    box = Box(slice=s, top_left=(c - 8, r - 8), bottom_right=(c + 9, r + 9), label="Spot", score=0.9)  # around the marker
    path = write_overlay_png(series, labels, tmp_path / "overlay.png", [box], (MARKER,))
    _, panels = render_overlay(series, labels, [box], (MARKER,))
    with Image.open(path) as png:
        rgb = np.asarray(png.convert("RGB"))
    assert [p.name for p in panels] == ["Axial", "Coronal", "Sagittal"]
    assert [p.letters for p in panels] == [("A", "P", "R", "L"), ("S", "I", "R", "L"), ("S", "I", "A", "P")]
    for panel in panels:
        left, top, right, bottom = panel.box
        image = rgb[top:bottom, left:right]
        rows, columns = np.nonzero((image == MARKER.color).all(axis=-1))
        assert len(rows), f"{acquired}: no marker in the {panel.name} plane"
        # right, anterior and superior of the centre: upper left in every plane of the convention
        assert rows.mean() < image.shape[0] / 2, f"{acquired}, {panel.name}: the superior/anterior marker is low"
        assert columns.mean() < image.shape[1] / 2, f"{acquired}, {panel.name}: the right/anterior marker is on the right"
        # the edge letters are drawn beside the plane (white), on all four sides
        for strip in (rgb[top - 14:top - 2, left:right], rgb[bottom + 2:bottom + 14, left:right],
                      rgb[top:bottom, left - 14:left - 2], rgb[top:bottom, right + 2:right + 14]):
            assert (strip > 200).all(axis=-1).any(), f"{acquired}, {panel.name}: an edge letter is missing"
    # the box, drawn on its acquired image, lands on the marker in the plane it was acquired in
    acquired_plane = panels[0 if acquired == "axial CT" else 2]
    left, top, right, bottom = acquired_plane.box
    rows, columns = np.nonzero((rgb[top:bottom, left:right] == BOX_PALETTE[0]).all(axis=-1))
    assert len(rows) and rows.mean() < (bottom - top) / 2 and columns.mean() < (right - left) / 2
    # the legend below the planes: the marker's colour swatch and the box label's
    below = rgb[max(p.box[3] for p in panels) + 16:]
    assert (below == MARKER.color).all(axis=-1).sum() >= 100, "no legend swatch for the segment"
    assert (below == BOX_PALETTE[0]).all(axis=-1).any(), "no legend entry for the boxes"
    assert (below > 200).all(axis=-1).sum() > 50, "no legend text"
