"""Research-side files of a run: the image and the mask as NIfTI, a PNG overlay of three planes, a summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from .outputs import PALETTE as PALETTE_RGB
from .outputs import Box, SegmentSpec
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


# box outlines have colours of their own, so the legend tells them from segments
BOX_PALETTE = ((255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 128, 0), (128, 255, 0), (0, 128, 255))

# each plane of the overlay: the LPS axis it is a cut across, and the patient directions at its
# (top, bottom, left, right) edges, as radiology viewers show them (patient's right on the left
# of axial and coronal images, anterior on the left of sagittal ones, superior up)
PLANES = {"Axial": (2, ("A", "P", "R", "L")), "Coronal": (1, ("S", "I", "R", "L")), "Sagittal": (0, ("S", "I", "A", "P"))}
MARGIN, TITLE, GAP = 16, 18, 8  # pixels around each plane for its edge letters, above it for its name, between planes


@dataclass(frozen=True)
class OverlayPanel:
    """One plane of the overlay PNG: its name, its edge letters (top, bottom, left, right) and
    where its image lies on the canvas (left, top, right, bottom; right and bottom exclusive)."""

    name: str
    letters: tuple[str, str, str, str]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class _Canonical:
    """Volumes re-indexed (x, y, z) along LPS+ (to patient left, posterior, superior) by the
    volume's nearest axes: a permutation and flips of the (slice, row, column) grid, no resampling."""

    ornt: np.ndarray
    spacing: tuple[float, float, float]  # mm along x, y, z

    @classmethod
    def of(cls, series: Series) -> _Canonical:
        ornt = nib.orientations.io_orientation(series.affine)
        spacing = [0.0, 0.0, 0.0]
        for axis, (world, _) in enumerate(ornt):
            spacing[int(world)] = float(series.spacing[axis])
        return cls(ornt, (spacing[0], spacing[1], spacing[2]))

    def volume(self, array: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(array, self.ornt)

    def index(self, ijk, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """A (slice, row, column) index in the re-indexed grid."""
        out = [0, 0, 0]
        for axis, (world, flip) in enumerate(self.ornt):
            out[int(world)] = int(ijk[axis]) if flip > 0 else shape[axis] - 1 - int(ijk[axis])
        return out[0], out[1], out[2]


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A plane of an LPS+ (x, y, z) volume as (rows, columns) on screen (see ``PLANES``)."""
    if axis == 2:
        return volume[:, :, index].T  # rows anterior to posterior, columns right to left
    if axis == 1:
        return volume[:, index, :].T[::-1]  # rows superior to inferior, columns right to left
    return volume[index, :, :].T[::-1]  # rows superior to inferior, columns anterior to posterior


def _colours(segments, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Each label's display colour: its segment's (as in the SEG), else the palette's."""
    colours = {int(label): PALETTE[(int(label) - 1) % len(PALETTE)] for label in np.unique(labels) if label}
    colours.update({spec.label: np.array(spec.display_color(), dtype=np.float32) for spec in segments})
    return colours


def _plane(image: np.ndarray, labels: np.ndarray, outlines: np.ndarray, low: float, high: float,
           colours: dict[int, np.ndarray]) -> np.ndarray:
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1)[..., None] * 255.0
    rgb = np.repeat(grey, 3, axis=-1)
    for label in np.unique(labels):
        if label == 0:
            continue
        mask = labels == label
        colour = colours[int(label)]
        rgb[mask] = 0.7 * rgb[mask] + 0.3 * colour
        rgb[find_boundaries(mask, mode="inner")] = colour  # the outline in full colour
    for number in np.unique(outlines):
        if number:
            rgb[outlines == number] = BOX_PALETTE[(int(number) - 1) % len(BOX_PALETTE)]
    return rgb.astype(np.uint8)


def _box_outlines(shape: tuple[int, int, int], boxes: list[Box], names: list[str]) -> np.ndarray:
    """Each box's outline, two pixels wide, on its image in the (slice, row, column) grid, valued
    1 + its label's index in ``names`` (image coordinates are pixel edges: the outline lies on the
    box's edge pixels)."""
    outlines = np.zeros(shape, dtype=np.uint8)
    _, rows, columns = shape
    for box in boxes:
        value = names.index(box.label) + 1
        c0, r0 = (int(np.floor(v)) for v in box.top_left)
        c1, r1 = (int(np.ceil(v)) - 1 for v in box.bottom_right)
        c0, c1 = max(0, min(c0, columns - 1)), max(0, min(c1, columns - 1))
        r0, r1 = max(0, min(r0, rows - 1)), max(0, min(r1, rows - 1))
        image = outlines[box.slice]
        for width in range(2):
            image[min(r0 + width, r1), c0:c1 + 1] = value
            image[max(r1 - width, r0), c0:c1 + 1] = value
            image[r0:r1 + 1, min(c0 + width, c1)] = value
            image[r0:r1 + 1, max(c1 - width, c0)] = value
    return outlines


def _resized(rgb: np.ndarray, height_mm: float, width_mm: float, pixel_mm: float) -> Image.Image:
    size = (max(1, round(width_mm / pixel_mm)), max(1, round(height_mm / pixel_mm)))
    return Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.Resampling.NEAREST)


def render_overlay(series: Series, labels: np.ndarray | None, boxes: Sequence[Box] = (),
                   segments: tuple[SegmentSpec, ...] = ()) -> tuple[Image.Image, list[OverlayPanel]]:
    """The axial, coronal and sagittal planes through the mask's centre (the most confident box's,
    else the volume's), in radiological view computed from the volume's orientation, in physical
    proportions, each named and with patient directions at its edges; the mask blended in its
    segments' colours with outlines, boxes outlined where a plane cuts them, and the acquired plane
    through the most confident box added when the others miss its image; a legend below."""
    pixels = series.pixels
    labels = np.zeros(pixels.shape, dtype=np.uint8) if labels is None else labels
    boxes = list(boxes)
    names = sorted({b.label for b in boxes})
    low, high = np.percentile(pixels, [1, 99])
    where = np.argwhere(labels > 0)
    best = max(boxes, key=lambda b: -1 if b.score is None else b.score) if boxes else None
    centre = np.array(pixels.shape) // 2
    if len(where):
        centre = where.mean(axis=0).round().astype(int)
    elif best is not None:
        centre = np.array([best.slice, (best.top_left[1] + best.bottom_right[1]) / 2,
                           (best.top_left[0] + best.bottom_right[0]) / 2]).astype(int)
    canonical = _Canonical.of(series)
    image, mask = canonical.volume(pixels), canonical.volume(labels)
    outlines = canonical.volume(_box_outlines(pixels.shape, boxes, names))
    colours = _colours(segments, labels)
    pixel_mm = min(canonical.spacing)
    wanted = [(name, name, canonical.index(centre, pixels.shape)) for name in PLANES]
    acquired = next(name for name, (axis, _) in PLANES.items() if axis == int(canonical.ornt[0][0]))
    if best is not None and best.slice != centre[0]:
        box_centre = (best.slice, int(centre[1]), int(centre[2]))
        title = f"{acquired}, best box (image {best.slice + 1})"
        wanted.append((acquired, title, canonical.index(box_centre, pixels.shape)))
    planes: list[tuple[str, tuple[str, str, str, str], Image.Image]] = []
    for name, title, point in wanted:
        axis, letters = PLANES[name]
        rows_axis, columns_axis = {2: (1, 0), 1: (2, 0), 0: (2, 1)}[axis]
        rgb = _plane(_cut(image, axis, point[axis]), _cut(mask, axis, point[axis]), _cut(outlines, axis, point[axis]),
                     low, high, colours)
        picture = _resized(rgb, image.shape[rows_axis] * canonical.spacing[rows_axis],
                           image.shape[columns_axis] * canonical.spacing[columns_axis], pixel_mm)
        planes.append((title, letters, picture))
    return _compose(planes, _legend_entries(labels, segments, colours, boxes, names))


def _rgb(colour) -> tuple[int, int, int]:
    return int(colour[0]), int(colour[1]), int(colour[2])


def _legend_entries(labels, segments, colours, boxes, names) -> list[tuple[str, tuple[int, int, int], bool]]:
    """(text, colour, is a box) for every segment in the map and every box label."""
    present = set(np.unique(labels).tolist()) - {0}
    by_label = {spec.label: spec.name for spec in segments}
    entries = [(by_label.get(label, f"label {label}"), _rgb(colours[label]), False) for label in sorted(present)]
    for index, name in enumerate(names):
        count = sum(1 for b in boxes if b.label == name)
        entries.append((f"{name}: {count} box{'es' if count != 1 else ''}", BOX_PALETTE[index % len(BOX_PALETTE)], True))
    return entries


def _compose(planes, entries) -> tuple[Image.Image, list[OverlayPanel]]:
    font = ImageFont.load_default(12)
    height = max(p.height for _, _, p in planes) + 2 * MARGIN + TITLE
    width = sum(p.width + 2 * MARGIN for _, _, p in planes) + GAP * (len(planes) - 1)
    legend_rows = max(1, len(entries))
    canvas = Image.new("RGB", (max(width, 240), height + 8 + 18 * legend_rows), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    panels, x = [], 0
    for title, letters, picture in planes:
        left, top = x + MARGIN, TITLE + MARGIN + (height - TITLE - 2 * MARGIN - picture.height) // 2
        canvas.paste(picture, (left, top))
        right, bottom = left + picture.width, top + picture.height
        draw.text((x + 2, 2), title, fill=(255, 255, 255), font=font)
        centre_x, centre_y = (left + right) // 2, (top + bottom) // 2
        colour = (255, 255, 255)
        draw.text((centre_x, top - MARGIN // 2), letters[0], fill=colour, font=font, anchor="mm")
        draw.text((centre_x, bottom + MARGIN // 2), letters[1], fill=colour, font=font, anchor="mm")
        draw.text((left - MARGIN // 2, centre_y), letters[2], fill=colour, font=font, anchor="mm")
        draw.text((right + MARGIN // 2, centre_y), letters[3], fill=colour, font=font, anchor="mm")
        panels.append(OverlayPanel(title, letters, (left, top, right, bottom)))
        x += picture.width + 2 * MARGIN + GAP
    y = height + 8
    for text, colour, is_box in entries or [("no segment, no box", (128, 128, 128), False)]:
        if is_box:
            draw.rectangle((8, y, 20, y + 12), outline=colour, width=2)
        else:
            draw.rectangle((8, y, 20, y + 12), fill=colour)
        draw.text((28, y), text, fill=(255, 255, 255), font=font)
        y += 18
    return canvas, panels


def write_overlay_png(series: Series, labels: np.ndarray | None, path: Path, boxes: Sequence[Box] = (),
                      segments: tuple[SegmentSpec, ...] = ()) -> Path:
    """``render_overlay`` as a PNG file."""
    render_overlay(series, labels, boxes, segments)[0].save(path)
    return path


def run_summary(outcome) -> list[str]:
    """What a run found, one line each, for people: segments with volumes, then scores, classes,
    box counts and probability maxima by output key, then the runtime's notes (a
    :class:`~pacsworker.worker.runtime.RunOutcome`; the whole record is ``outputs.json``)."""
    lines = []
    unit = " HU" if outcome.volume is not None and outcome.volume.modality == "CT" else ""
    for stat in outcome.statistics:
        lines.append(f"segment {stat.spec.name}: {stat.volume_ml:.1f} mL ({stat.voxels} voxels), "
                     f"mean {stat.mean_value:.1f}{unit}")
    for key, value in outcome.values.items():
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind == "score":
            lines.append(f"score {key} ({value['name'][2]}): {value['value']:.4g}")
        elif kind == "classification":
            meaning = f" = {value['meaning'][2]}" if value.get("meaning") else ""
            score = f", score {value['score']:.3g}" if value.get("score") is not None else ""
            lines.append(f"class {key} ({value['name'][2]}): {value['value']}{meaning}{score}")
        elif kind == "boxes":
            boxes = value["boxes"]
            labels: dict[str, int] = {}
            for box in boxes:
                labels[box["label"]] = labels.get(box["label"], 0) + 1
            scores = [box["score"] for box in boxes if box.get("score") is not None]
            by_label = ", ".join(f"{label} {count}" for label, count in labels.items())
            best = f", best score {max(scores):.3g}" if scores else ""
            lines.append(f"boxes {key}: {len(boxes)}" + (f" ({by_label}){best}" if boxes else ""))
        elif kind == "probabilities":
            maxima = ", ".join(f"{name} {p:.3g}" for name, p in value["segments"].items())
            lines.append(f"probabilities {key}: maximum {maxima}")
        elif kind == "labelmap" and not outcome.statistics:
            lines.append(f"label map {key}: no segment found")
    lines += [f"note: {note}" for note in outcome.values.get("runtime_notes", [])]
    return lines
