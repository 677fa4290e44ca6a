"""Research-side files of a run: the image and the mask as NIfTI, and a PNG overlay of three planes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from .outputs import PALETTE as PALETTE_RGB
from .outputs import Box
from .series import Series

PALETTE = np.array(PALETTE_RGB, dtype=np.float32)


def nifti_affine(series: Series) -> np.ndarray:
    """Affine of an array indexed (column, row, slice) in NIfTI's RAS+ world (mm)."""
    lps = series.affine[:, [2, 1, 0, 3]]  # (slice, row, column) -> (column, row, slice)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_nifti(series: Series, labels: np.ndarray, folder: Path) -> tuple[Path, Path]:
    """``image.nii.gz`` (modality units) and ``mask.nii.gz`` (labels), in the same grid."""
    affine = nifti_affine(series)
    image_path, mask_path = folder / "image.nii.gz", folder / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(series.pixels.transpose(2, 1, 0)), affine), image_path)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.astype(np.uint8).transpose(2, 1, 0)), affine), mask_path)
    return image_path, mask_path


def _plane(image: np.ndarray, labels: np.ndarray, low: float, high: float) -> np.ndarray:
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1)[..., None] * 255.0
    rgb = np.repeat(grey, 3, axis=-1)
    for label in np.unique(labels):
        if label == 0:
            continue
        mask = labels == label
        colour = PALETTE[(int(label) - 1) % len(PALETTE)]
        rgb[mask] = 0.7 * rgb[mask] + 0.3 * colour
        rgb[find_boundaries(mask, mode="inner")] = colour  # the outline in full colour
    return rgb.astype(np.uint8)


def _draw_boxes(rgb: np.ndarray, boxes: list[Box], labels: list[str]) -> np.ndarray:
    """Each box's outline, two pixels wide, in its label's palette colour (image coordinates are
    pixel edges: the outline lies on the box's edge pixels)."""
    rows, columns = rgb.shape[:2]
    for box in boxes:
        colour = PALETTE[labels.index(box.label) % len(PALETTE)]
        c0, r0 = (int(np.floor(v)) for v in box.top_left)
        c1, r1 = (int(np.ceil(v)) - 1 for v in box.bottom_right)
        c0, c1 = max(0, min(c0, columns - 1)), max(0, min(c1, columns - 1))
        r0, r1 = max(0, min(r0, rows - 1)), max(0, min(r1, rows - 1))
        for width in range(2):
            rgb[min(r0 + width, r1), c0:c1 + 1] = colour
            rgb[max(r1 - width, r0), c0:c1 + 1] = colour
            rgb[r0:r1 + 1, min(c0 + width, c1)] = colour
            rgb[r0:r1 + 1, max(c1 - width, c0)] = colour
    return rgb


def _resized(rgb: np.ndarray, height_mm: float, width_mm: float, pixel_mm: float) -> Image.Image:
    size = (max(1, round(width_mm / pixel_mm)), max(1, round(height_mm / pixel_mm)))
    return Image.fromarray(rgb).resize(size, Image.NEAREST)


def write_overlay_png(series: Series, labels: np.ndarray | None, path: Path, boxes: list[Box] = ()) -> Path:
    """The three orthogonal planes through the mask's centre (the volume's if empty), side by side,
    with physical aspect ratios, the mask blended in colour with its outlines; boxes are drawn on
    the slice plane, and the slice with the most confident box is added when it is another one."""
    pixels = series.pixels
    labels = np.zeros(pixels.shape, dtype=np.uint8) if labels is None else labels
    boxes = list(boxes)
    low, high = np.percentile(pixels, [1, 99])
    where = np.argwhere(labels > 0)
    centre = np.array(pixels.shape) // 2
    if len(where):
        centre = where.mean(axis=0).round().astype(int)
    best = max(boxes, key=lambda b: -1 if b.score is None else b.score) if boxes else None
    if best is not None and not len(where):
        centre[0] = best.slice_index
    s, r, c = centre
    d_s, d_r, d_c = series.spacing
    pixel_mm = min(series.spacing)
    n_s, n_r, n_c = pixels.shape
    names = sorted({b.label for b in boxes})

    def slice_plane(index: int) -> Image.Image:
        rgb = _draw_boxes(_plane(pixels[index], labels[index], low, high),
                          [b for b in boxes if b.slice_index == index], names)
        return _resized(rgb, n_r * d_r, n_c * d_c, pixel_mm)

    planes = [
        slice_plane(s),
        _resized(_plane(pixels[:, r, :], labels[:, r, :], low, high)[::-1], n_s * d_s, n_c * d_c, pixel_mm),
        _resized(_plane(pixels[:, :, c], labels[:, :, c], low, high)[::-1], n_s * d_s, n_r * d_r, pixel_mm),
    ]
    if best is not None and best.slice_index != s:
        planes.append(slice_plane(best.slice_index))
    height = max(p.height for p in planes)
    canvas = Image.new("RGB", (sum(p.width for p in planes) + 8 * (len(planes) - 1), height))
    x = 0
    for plane in planes:
        canvas.paste(plane, (x, (height - plane.height) // 2))
        x += plane.width + 8
    canvas.save(path)
    return path
