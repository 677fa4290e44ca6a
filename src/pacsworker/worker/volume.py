"""A spooled series as a 3D volume: slices sorted along the normal, modality units, geometry kept."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset


class VolumeOutcome(str, enum.Enum):
    """What loading a series as a volume came to (the values of ``catalog.json``'s ``expected``)."""

    VOLUME = "volume"
    VOLUME_TILTED = "volume-tilted"
    NOT_A_VOLUME = "not-a-volume"
    IRREGULAR_SPACING = "irregular-spacing"
    MIXED_ORIENTATION = "mixed-orientation"


class NotAVolumeError(ValueError):
    """The series cannot be treated as one regularly sampled 3D volume."""

    def __init__(self, outcome: VolumeOutcome, reason: str):
        super().__init__(f"{outcome.value}: {reason}")
        self.outcome = outcome
        self.reason = reason


@dataclass(frozen=True)
class SliceSource:
    """Where one slice of the volume came from: an instance and, for multi-frame, a frame (1-based)."""

    dataset: Dataset  # header only; pixel data dropped after decoding
    frame_number: int | None
    position: tuple[float, float, float]
    rescale: tuple[float, float] = (1.0, 0.0)  # (slope, intercept) applied to this slice


@dataclass
class Volume:
    """A regularly sampled volume; ``pixels`` is (slices, rows, columns) in modality units (HU on CT).

    ``row_spacing`` and ``column_spacing`` follow DICOM Pixel Spacing order (mm);
    ``slice_spacing`` is the distance between consecutive slice centres along the normal (mm).
    """

    pixels: np.ndarray
    sources: list[SliceSource]
    orientation: tuple[float, ...]
    row_spacing: float
    column_spacing: float
    slice_spacing: float
    slice_thickness: float | None
    outcome: VolumeOutcome

    def rescale_of(self, index: int) -> tuple[float, float]:
        """(slope, intercept) the loader applied to slice ``index``."""
        return self.sources[index].rescale

    @property
    def voxel_volume_ml(self) -> float:
        return self.row_spacing * self.column_spacing * self.slice_spacing / 1000.0

    @property
    def series_uid(self) -> str:
        return str(self.sources[0].dataset.SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].dataset.StudyInstanceUID)

    @property
    def modality(self) -> str:
        return str(self.sources[0].dataset.get("Modality", ""))

    @property
    def source_datasets(self) -> list[Dataset]:
        """Distinct source instances in slice order (one per instance, multi-frame counted once)."""
        seen: dict[str, Dataset] = {}
        for source in self.sources:
            seen.setdefault(str(source.dataset.SOPInstanceUID), source.dataset)
        return list(seen.values())


def _floats(value, n: int, what: str) -> tuple[float, ...]:
    if value is None or len(value) != n:
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"{what} missing or malformed")
    return tuple(float(v) for v in value)


def _rescale(item: Dataset | None, fallback: Dataset) -> tuple[float, float]:
    source = item if item is not None and "RescaleSlope" in item else fallback
    return float(source.get("RescaleSlope", 1) or 1), float(source.get("RescaleIntercept", 0) or 0)


@dataclass
class _Plane:
    dataset: Dataset
    frame_number: int | None
    frame: np.ndarray
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    spacing: tuple[float, float]
    thickness: float | None
    rescale: tuple[float, float]


NATIVE_LITTLE_ENDIAN = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (inflated when read)
}


def _stored_values(ds: Dataset) -> np.ndarray:
    """The stored values, (frames, rows, columns) or (rows, columns) for one frame.

    Native little-endian grey images are read straight from the Pixel Data bytes (a view, no
    copy; unused high bits cleared as pydicom does); everything else (compressed, big endian,
    colour, float) goes through pydicom's decoders.
    """
    transfer_syntax = str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or "")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if (transfer_syntax in NATIVE_LITTLE_ENDIAN and "PixelData" in ds and bits in (8, 16, 32)
            and int(ds.get("SamplesPerPixel", 1) or 1) == 1):
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        count = rows * columns * frames
        data = ds.PixelData
        if len(data) >= count * dtype.itemsize:
            values = np.frombuffer(data, dtype=dtype, count=count).reshape(frames, rows, columns)
            unused = bits - int(ds.get("BitsStored", bits) or bits)
            if 0 < unused < bits:
                values = np.right_shift(np.left_shift(values, unused), unused)  # sign or zero extension
            return values[0] if frames == 1 else values
    return ds.pixel_array


def _planes_of(ds: Dataset) -> list[_Plane]:
    pixels = _stored_values(ds)
    number_of_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if number_of_frames > 1:
            raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, "multi-frame instance without per-frame geometry")
        slope, intercept = _rescale(None, ds)
        spacing = _floats(ds.get("PixelSpacing"), 2, "Pixel Spacing")
        thickness = ds.get("SliceThickness")
        return [
            _Plane(
                ds, None, pixels,
                _floats(ds.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)"),
                _floats(ds.get("ImagePositionPatient"), 3, "Image Position (Patient)"),
                (spacing[0], spacing[1]),
                float(thickness) if thickness not in (None, "") else None,
                (slope, intercept),
            )
        ]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    planes = []
    for index, frame_item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        def group(keyword: str) -> Dataset | None:
            for container in (frame_item, shared):
                if keyword in container and len(container[keyword].value):
                    return container[keyword].value[0]
            return None

        orientation = group("PlaneOrientationSequence")
        position = group("PlanePositionSequence")
        measures = group("PixelMeasuresSequence")
        if orientation is None or position is None or measures is None:
            raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"frame {index + 1} lacks plane geometry")
        slope, intercept = _rescale(group("PixelValueTransformationSequence"), ds)
        spacing = _floats(measures.get("PixelSpacing"), 2, "Pixel Spacing")
        thickness = measures.get("SliceThickness")
        planes.append(
            _Plane(
                ds, index + 1, pixels[index],
                _floats(orientation.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)"),
                _floats(position.get("ImagePositionPatient"), 3, "Image Position (Patient)"),
                (spacing[0], spacing[1]),
                float(thickness) if thickness not in (None, "") else None,
                (slope, intercept),
            )
        )
    return planes


def _modality_values(planes: list[_Plane]) -> np.ndarray:
    """The planes' stored values rescaled to modality units (float32), in one preallocated array."""
    pixels = np.empty((len(planes), *planes[0].frame.shape), dtype=np.float32)
    for out, plane in zip(pixels, planes):
        slope, intercept = plane.rescale
        np.multiply(plane.frame, np.float32(slope), out=out, casting="unsafe")
        if intercept:
            np.add(out, np.float32(intercept), out=out)
    return pixels


def load_series(files: list[Path], *, spacing_tolerance: float = 0.01) -> Volume:
    """Load the instances of one series as a volume.

    Parameters
    ----------
    files:
        Paths of the series' instances (single-frame or enhanced multi-frame), in any order.
    spacing_tolerance:
        Largest allowed relative deviation of a slice gap from the median gap.

    Raises
    ------
    NotAVolumeError
        With the outcome (not-a-volume, irregular-spacing, mixed-orientation) and the reason.
    """
    planes: list[_Plane] = []
    for path in files:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"instance {ds.SOPInstanceUID} has no pixel data")
        planes.extend(_planes_of(ds))
        del ds.PixelData  # headers are kept for references; pixels live in the array
    if len(planes) < 2:
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"{len(planes)} image plane(s); a volume needs at least 2")
    shapes = {p.frame.shape for p in planes}
    if len(shapes) > 1:
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"planes differ in size: {sorted(shapes)}")
    orientation = np.array(planes[0].orientation)
    for plane in planes[1:]:
        if not np.allclose(plane.orientation, orientation, atol=1e-3):
            raise NotAVolumeError(
                VolumeOutcome.MIXED_ORIENTATION,
                f"orientations {planes[0].orientation} and {plane.orientation} in one series",
            )
    if len({p.spacing for p in planes}) > 1:
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, "pixel spacing differs between planes")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([p.position for p in planes])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    distances, positions = distances[order], positions[order]
    planes = [planes[i] for i in order]
    gaps = np.diff(distances)
    if np.any(gaps < 1e-3):
        duplicates = int(np.sum(gaps < 1e-3)) + 1
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"{duplicates} planes share a position along the normal")
    median = float(np.median(gaps))
    if np.max(np.abs(gaps - median)) > spacing_tolerance * median:
        raise NotAVolumeError(
            VolumeOutcome.IRREGULAR_SPACING,
            f"slice gaps from {gaps.min():.3f} to {gaps.max():.3f} mm (median {median:.3f} mm)",
        )
    # positions off the normal line mean a sheared (gantry-tilted) grid
    offsets = (positions - positions[0]) - np.outer(distances - distances[0], normal)
    tilted = bool(np.max(np.linalg.norm(offsets, axis=1)) > 1e-2)
    return Volume(
        pixels=_modality_values(planes),
        sources=[SliceSource(p.dataset, p.frame_number, p.position, p.rescale) for p in planes],
        orientation=tuple(float(v) for v in orientation),
        row_spacing=planes[0].spacing[0],
        column_spacing=planes[0].spacing[1],
        slice_spacing=median,
        slice_thickness=planes[0].thickness,
        outcome=VolumeOutcome.VOLUME_TILTED if tilted else VolumeOutcome.VOLUME,
    )
