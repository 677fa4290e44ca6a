"""Research-side files of a run: the image and the mask as NIfTI, and a PNG overlay of three planes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from .outputs import PALETTE as PALETTE_RGB
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


def _resized(rgb: np.ndarray, height_mm: float, width_mm: float, pixel_mm: float) -> Image.Image:
    size = (max(1, round(width_mm / pixel_mm)), max(1, round(height_mm / pixel_mm)))
    return Image.fromarray(rgb).resize(size, Image.NEAREST)


def write_overlay_png(series: Series, labels: np.ndarray, path: Path) -> Path:
    """The three orthogonal planes through the mask's centre (the volume's if empty), side by side,
    with physical aspect ratios, the mask blended in colour."""
    pixels = series.pixels
    low, high = np.percentile(pixels, [1, 99])
    where = np.argwhere(labels > 0)
    centre = where.mean(axis=0).round().astype(int) if len(where) else np.array(pixels.shape) // 2
    s, r, c = centre
    d_s, d_r, d_c = series.spacing
    pixel_mm = min(series.spacing)
    n_s, n_r, n_c = pixels.shape
    planes = [
        _resized(_plane(pixels[s], labels[s], low, high), n_r * d_r, n_c * d_c, pixel_mm),  # slice plane
        _resized(_plane(pixels[:, r, :], labels[:, r, :], low, high)[::-1], n_s * d_s, n_c * d_c, pixel_mm),
        _resized(_plane(pixels[:, :, c], labels[:, :, c], low, high)[::-1], n_s * d_s, n_r * d_r, pixel_mm),
    ]
    height = max(p.height for p in planes)
    canvas = Image.new("RGB", (sum(p.width for p in planes) + 8 * (len(planes) - 1), height))
    x = 0
    for plane in planes:
        canvas.paste(plane, (x, (height - plane.height) // 2))
        x += plane.width + 8
    canvas.save(path)
    return path
