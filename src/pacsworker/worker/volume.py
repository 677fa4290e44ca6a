"""A spooled series as a 3D volume: slices sorted along the normal, modality units, geometry kept."""

from __future__ import annotations

import enum
import gc
import logging
import math
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

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


class UndecodablePixelData(ValueError):
    """An instance's pixel data cannot be decoded (a corrupt compressed stream, a codec missing)."""


@dataclass(frozen=True)
class SliceSource:
    """Where one slice of the volume came from: an instance and, for multi-frame, a frame (1-based)."""

    dataset: Dataset  # header only; pixel data dropped after decoding
    frame_number: int | None
    position: tuple[float, float, float]
    rescale: tuple[float, float] = (1.0, 0.0)  # (slope, intercept) applied to this slice


@dataclass
class Volume:
    """A stack of parallel slices; ``pixels`` is (slices, rows, columns) in modality units (HU on CT).

    ``row_spacing`` and ``column_spacing`` follow DICOM Pixel Spacing order (mm);
    ``slice_spacing`` is the distance between consecutive slice centres along the normal (mm).
    The stack is regularly sampled unless ``outcome`` is irregular-spacing (loaded only when asked
    for): then ``slice_spacing`` is the median gap, each source keeps its true position, and
    ``notes`` say which gaps differ.
    """

    pixels: np.ndarray
    sources: list[SliceSource]
    orientation: tuple[float, ...]
    row_spacing: float
    column_spacing: float
    slice_spacing: float
    slice_thickness: float | None
    outcome: VolumeOutcome
    notes: list[str] = field(default_factory=list)  # what the loader accepted that is not regular

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
    def frame_of_reference_uid(self) -> str | None:
        """The Frame of Reference UID every source instance carries; None when one has none or they
        differ (an anonymiser's per-slice UIDs): results then use one derived frame of reference."""
        found = {str(ds.get("FrameOfReferenceUID") or "") for ds in self.source_datasets}
        return found.pop() if len(found) == 1 and "" not in found else None

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


def _point(value, what: str) -> tuple[float, float, float]:
    x, y, z = _floats(value, 3, what)
    return x, y, z


class _HeaderValues:
    """Header values of one series, each distinct encoded value converted once by pydicom.

    Most pixel-module and geometry values repeat in every instance of a series; converting their
    raw bytes once per series instead of once per instance is a good share of the loader's time.
    """

    def __init__(self) -> None:
        self._converted: dict[tuple, object] = {}

    def get(self, ds: Dataset, keyword: str, default=None):
        """What ``ds.get(keyword, default)`` gives."""
        tag = tag_for_keyword(keyword)
        if tag is None:  # not a keyword of the dictionary: as ds.get does
            return ds.get(keyword, default)
        element = ds.get_item(tag, keep_deferred=True)
        if element is None:
            return default
        if type(element) is not RawDataElement or element.value is None:
            return ds[tag].value
        key = (tag, element.VR, element.value, element.is_little_endian)
        if key not in self._converted:
            self._converted[key] = ds[tag].value
        return self._converted[key]


def _rescale(values: _HeaderValues, item: Dataset | None, fallback: Dataset) -> tuple[float, float]:
    source = item if item is not None and "RescaleSlope" in item else fallback
    return float(values.get(source, "RescaleSlope", 1) or 1), float(values.get(source, "RescaleIntercept", 0) or 0)


NATIVE_LITTLE_ENDIAN = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (inflated when read)
}
DEFLATED = "1.2.840.10008.1.2.1.99"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_DEFER_BYTES = 16 * 1024  # dcmread locates, and does not read, top-level values longer than this
_READ_BYTES = 4 * 1024 * 1024  # frames of a multi-frame instance are read in runs of about this size


def _native_dtype(ds: Dataset, values: _HeaderValues | None = None) -> np.dtype | None:
    """The dtype of native little-endian grey Pixel Data, which can be read as it is stored; else None."""
    values = values or _HeaderValues()
    transfer_syntax = str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or "")
    bits = int(values.get(ds, "BitsAllocated", 0) or 0)
    if (transfer_syntax not in NATIVE_LITTLE_ENDIAN or bits not in (8, 16, 32)
            or int(values.get(ds, "SamplesPerPixel", 1) or 1) != 1):
        return None
    signed = int(values.get(ds, "PixelRepresentation", 0) or 0) == 1
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def _clear_unused_bits(values: np.ndarray, stored: int) -> np.ndarray:
    """Unused high bits (above ``stored`` bits) cleared, sign-extended when signed, as pydicom does."""
    bits = values.dtype.itemsize * 8
    if 0 < stored < bits:
        if not values.flags.writeable:
            values = values.copy()
        if values.dtype.kind == "u":
            np.bitwise_and(values, values.dtype.type((1 << stored) - 1), out=values)
        else:
            np.left_shift(values, bits - stored, out=values)
            np.right_shift(values, bits - stored, out=values)
    return values


def _stored_values(ds: Dataset) -> np.ndarray:
    """The stored values, (frames, rows, columns) or (rows, columns) for one frame.

    Native little-endian grey images are read straight from the Pixel Data bytes (unused high bits
    cleared as pydicom does); everything else (compressed, big endian, colour, float) goes through
    pydicom's decoders.
    """
    dtype = _native_dtype(ds)
    if dtype is not None and "PixelData" in ds:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        count = rows * columns * frames
        data = ds.PixelData
        if len(data) >= count * dtype.itemsize:
            values = np.frombuffer(data, dtype=dtype, count=count)
            values = _clear_unused_bits(values, int(ds.get("BitsStored", 0) or 0))
            values = values.reshape(frames, rows, columns)
            return values[0] if frames == 1 else values
    return ds.pixel_array


@dataclass(eq=False)
class _Instance:
    """One source file: its header without pixel data, and where its stored values come from."""

    dataset: Dataset
    shape: tuple[int, ...]  # (frames, rows, columns[, samples])
    offset: int | None = None  # file offset of native Pixel Data, read straight into the volume
    dtype: np.dtype | None = None
    bits_stored: int = 0
    decoded: Future | None = None  # pydicom's decoding (when offset is None), running in the pool

    def read(self, first: int, count: int, buffer: np.ndarray) -> np.ndarray:
        """Frames ``first`` to ``first + count`` of native Pixel Data, read into ``buffer`` (bytes)."""
        offset, dtype = self.offset, self.dtype
        if offset is None or dtype is None:
            raise ValueError(f"{self.dataset.filename}: pixel data not native; pydicom decodes it")
        frame_values = math.prod(self.shape[1:])
        size = count * frame_values * dtype.itemsize
        view = buffer.data[:size]
        with open(self.dataset.filename, "rb", buffering=0) as file:
            file.seek(offset + first * frame_values * dtype.itemsize)
            done = 0
            while done < size:
                got = file.readinto(view[done:])
                if not got:
                    raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"{self.dataset.filename}: pixel data ends early")
                done += got
        values = np.frombuffer(buffer, dtype=dtype, count=count * frame_values).reshape(count, *self.shape[1:])
        return _clear_unused_bits(values, self.bits_stored)


def _decode(ds: Dataset, shape: tuple[int, ...]) -> np.ndarray:
    try:
        values = _stored_values(ds)
    except Exception as exc:  # noqa: BLE001 - any decoder's failure: the instance is named with the first line
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax or "unknown transfer syntax"))
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc).strip())
        raise UndecodablePixelData(
            f"instance {ds.get('SOPInstanceUID', '?')} ({name}): pixel data cannot be decoded: {detail[:300]}"
        ) from None
    values = values.reshape(shape) if values.size == math.prod(shape) else values
    if values.shape != shape:
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"decoded pixel data {values.shape}, header says {shape}")
    return values


def _read_instance(path: Path, values: _HeaderValues) -> _Instance:
    """The header of one file, read once; native pixel data located, anything else read for decoding."""
    ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    pixel = None
    for element in [e for e in ds.values() if type(e) is RawDataElement and e.value is None and e.length]:
        if element.tag in _PIXEL_TAGS:
            pixel = element
        else:
            ds[element.tag]  # a large header value: read now, so the header never needs the file again
    if pixel is not None and str(ds.file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
        ds, pixel = pydicom.dcmread(path), None  # its offsets point into the inflated stream
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"instance {ds.SOPInstanceUID} has no pixel data")
    samples = int(values.get(ds, "SamplesPerPixel", 1) or 1)
    shape: tuple[int, ...] = (
        int(values.get(ds, "NumberOfFrames", 1) or 1), int(values.get(ds, "Rows")), int(values.get(ds, "Columns"))
    )
    shape += (samples,) if samples > 1 else ()
    dtype = _native_dtype(ds, values)
    if (pixel is not None and pixel.tag == 0x7FE00010 and dtype is not None
            and pixel.length != 0xFFFFFFFF and pixel.length >= math.prod(shape) * dtype.itemsize):
        del ds.PixelData  # headers are kept for references; pixels go straight to the volume
        return _Instance(ds, shape, pixel.value_tell, dtype, int(values.get(ds, "BitsStored", 0) or 0))
    if pixel is not None:
        ds[pixel.tag]  # compressed or otherwise encoded: read now, decoded by pydicom in the pool
    return _Instance(ds, shape)


@dataclass(eq=False)
class _Plane:
    instance: _Instance
    frame_number: int | None
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    spacing: tuple[float, float]
    thickness: float | None
    rescale: tuple[float, float]

    @property
    def dataset(self) -> Dataset:
        return self.instance.dataset


def _planes_of(instance: _Instance, values: _HeaderValues) -> list[_Plane]:
    ds = instance.dataset
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if instance.shape[0] > 1:
            raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, "multi-frame instance without per-frame geometry")
        spacing = _floats(values.get(ds, "PixelSpacing"), 2, "Pixel Spacing")
        thickness = values.get(ds, "SliceThickness")
        return [
            _Plane(
                instance, None,
                _floats(values.get(ds, "ImageOrientationPatient"), 6, "Image Orientation (Patient)"),
                _point(values.get(ds, "ImagePositionPatient"), "Image Position (Patient)"),
                (spacing[0], spacing[1]),
                float(thickness) if thickness not in (None, "") else None,
                _rescale(values, None, ds),
            )
        ]
    planes = []
    for index, frame_item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        orientation = _frame_group(ds, frame_item, "PlaneOrientationSequence")
        position = _frame_group(ds, frame_item, "PlanePositionSequence")
        measures = _frame_group(ds, frame_item, "PixelMeasuresSequence")
        if orientation is None or position is None or measures is None:
            raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"frame {index + 1} lacks plane geometry")
        spacing = _floats(values.get(measures, "PixelSpacing"), 2, "Pixel Spacing")
        thickness = values.get(measures, "SliceThickness")
        planes.append(
            _Plane(
                instance, index + 1,
                _floats(values.get(orientation, "ImageOrientationPatient"), 6, "Image Orientation (Patient)"),
                _point(values.get(position, "ImagePositionPatient"), "Image Position (Patient)"),
                (spacing[0], spacing[1]),
                float(thickness) if thickness not in (None, "") else None,
                _rescale(values, _frame_group(ds, frame_item, "PixelValueTransformationSequence"), ds),
            )
        )
    if len(planes) != instance.shape[0]:
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"{len(planes)} per-frame groups for {instance.shape[0]} frames")
    return planes


def _frame_group(ds: Dataset, frame_item: Dataset, keyword: str) -> Dataset | None:
    """A functional group's item for one frame: its per-frame item, else the shared one."""
    for container in (frame_item, ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]):
        if keyword in container and len(container[keyword].value):
            return container[keyword].value[0]
    return None


def _rescale_into(out: np.ndarray, stored: np.ndarray, rescale: tuple[float, float]) -> None:
    """``stored * slope + intercept`` in float32 arithmetic, written into ``out``."""
    slope, intercept = rescale
    if stored.dtype.itemsize <= 2 or stored.dtype == np.float32:
        np.copyto(out, stored, casting="unsafe")  # exact; a plain cast is faster than a casting ufunc
        if slope != 1:
            np.multiply(out, np.float32(slope), out=out)
    else:
        np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    if intercept:
        np.add(out, np.float32(intercept), out=out)


POPULATE_LIMIT = 2 << 30  # bytes: a larger guessed volume (a 4D series, say) is not committed before it is checked


def _populated(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array whose memory is mapped with every page in place (zeros).

    A volume is large (140 CT slices: 147 MB) and fresh memory is slow to fault in page by page,
    above all for huge pages a VM has handed back to its host (measured here: 0.25 s for 147 MB);
    MAP_POPULATE gets all pages in one system call, which releases the GIL, so it runs in the pool
    while headers are parsed.
    """
    size = math.prod(shape) * 4
    # only a guess until the series is known to be one volume: never commit more than this up front
    if not hasattr(mmap, "MAP_POPULATE") or size < 1 << 20 or size > POPULATE_LIMIT:
        return np.zeros(shape, dtype=np.float32)
    try:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    except OSError:  # no room to map it all now: let numpy fault it in as it is filled
        return np.zeros(shape, dtype=np.float32)
    return np.frombuffer(memory, dtype=np.float32).reshape(shape)


def _modality_values(planes: list[_Plane], pool: ThreadPoolExecutor, workers: int,
                     populated: Future | None = None) -> np.ndarray:
    """The planes' stored values rescaled to modality units (float32), written into one array.

    Native pixel data is read from the file straight into a small buffer per task and rescaled into
    the volume; the work is split into runs of frames spread over the pool (file reads and numpy
    release the GIL). ``populated`` is :func:`_populated` started early with the likely shape.
    """
    shape = (len(planes), *planes[0].instance.shape[1:])
    pixels = populated.result() if populated is not None else None
    if pixels is None or pixels.shape != shape:
        pixels = _populated(shape)
    by_instance: dict[int, list[tuple[int, _Plane]]] = {}
    for index, plane in enumerate(planes):
        by_instance.setdefault(id(plane.instance), []).append((index, plane))
    runs = []  # (instance, first frame, frame count, [(volume index, plane)]): one task's share
    for targets in by_instance.values():
        instance = targets[0][1].instance
        frames = instance.shape[0]
        if instance.offset is None or instance.dtype is None:  # decoded by pydicom (the two are set together)
            step = frames
        else:
            step = max(1, _READ_BYTES // (pixels[0].size * instance.dtype.itemsize))
        by_frame = {(plane.frame_number or 1) - 1: (index, plane) for index, plane in targets}
        for first in range(0, frames, step):
            wanted = [by_frame[f] for f in range(first, min(first + step, frames)) if f in by_frame]
            if wanted:
                runs.append((instance, first, min(step, frames - first), wanted))

    def fill(chunk) -> None:
        buffer = None
        for instance, first, count, wanted in chunk:
            if instance.offset is None:
                values, first = instance.decoded.result(), 0
            else:
                size = count * pixels[0].size * instance.dtype.itemsize
                if buffer is None or buffer.size < size:
                    buffer = np.empty(size, dtype=np.uint8)
                values = instance.read(first, count, buffer)
            for index, plane in wanted:
                _rescale_into(pixels[index], values[(plane.frame_number or 1) - 1 - first], plane.rescale)

    tasks = max(1, min(len(runs), workers * 4))
    list(pool.map(fill, [runs[i::tasks] for i in range(tasks)]))
    return pixels


# Attributes that tell apart planes at one position (4D data), checked in this order.
_DISTINGUISHING = ("TemporalPositionIdentifier", "EchoNumbers", "TriggerTime", "AcquisitionNumber", "DiffusionBValue")
_FRAME_DISTINGUISHING = (
    ("FrameContentSequence", "TemporalPositionIndex"),
    ("MREchoSequence", "EffectiveEchoTime"),
    ("MRDiffusionSequence", "DiffusionBValue"),
    ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
)


def _distinguishing_value(plane: _Plane, keyword: str):
    """The plane's value of ``keyword``: from its frame's functional group for enhanced multi-frame."""
    ds = plane.dataset
    if plane.frame_number is None:
        return ds.get(keyword)
    frame_item = ds.PerFrameFunctionalGroupsSequence[plane.frame_number - 1]
    for group, attribute in _FRAME_DISTINGUISHING:
        if attribute == keyword:
            item = _frame_group(ds, frame_item, group)
            return None if item is None else item.get(keyword)
    return ds.get(keyword)


def _repeated_positions_reason(groups: list[list[_Plane]], distances: list[float]) -> str:
    """Why planes sharing positions are refused: the 4D layout and what tells the planes apart."""
    counts = [len(group) for group in groups]
    if len(set(counts)) == 1:
        layout = f"4D data: {len(groups)} positions x {counts[0]} planes per position"
    else:
        shared = [i for i, count in enumerate(counts) if count > 1]
        layout = (f"{len(shared)} of {len(groups)} positions hold more than one plane (up to {max(counts)}; "
                  f"the first at {distances[shared[0]]:.3f} mm along the normal)")
    keywords = [*_DISTINGUISHING, *(attribute for _, attribute in _FRAME_DISTINGUISHING)]
    for keyword in dict.fromkeys(keywords):
        values = [[_distinguishing_value(p, keyword) for p in group] for group in groups if len(group) > 1]
        if all(None not in vs and len({str(v) for v in vs}) == len(vs) for vs in values):
            distinct = sorted({str(v) for vs in values for v in vs}, key=lambda v: (len(v), v))
            shown = ", ".join(distinct[:6]) + (", ..." if len(distinct) > 6 else "")
            return f"{layout}, told apart by {keyword} ({shown}); not one 3D volume"
    return f"{layout}, and no attribute ({', '.join(dict.fromkeys(keywords))}) tells them apart; not one 3D volume"


def _irregular_spacing_reason(planes: list[_Plane], distances: np.ndarray, median: float, tolerance: float) -> str:
    """Which gaps differ from the median, between which slices (first three), and missing slices if that is what fits."""
    gaps = np.diff(distances)
    off = np.flatnonzero(np.abs(gaps - median) > tolerance * median)

    def slice_name(index: int) -> str:
        plane = planes[index]
        if plane.frame_number is not None:
            return f"{index + 1} (frame {plane.frame_number})"
        number = plane.dataset.get("InstanceNumber")
        return f"{index + 1} (instance {number})" if number not in (None, "") else str(index + 1)

    where = [f"{gaps[i]:.3f} mm between slices {slice_name(i)} and {slice_name(i + 1)} at {distances[i]:.3f} "
             f"and {distances[i + 1]:.3f} mm along the normal" for i in off[:3]]
    reason = (f"slice gaps from {gaps.min():.3f} to {gaps.max():.3f} mm (median {median:.3f} mm); {len(off)} of "
              f"{len(gaps)} gaps differ from the median by more than {tolerance * 100:g}%: {'; '.join(where)}"
              + ("; ..." if len(off) > 3 else ""))
    multiples = gaps[off] / median
    if np.all(multiples > 1.5) and np.allclose(multiples, np.rint(multiples), atol=tolerance * np.rint(multiples)):
        missing = int(np.sum(np.rint(multiples) - 1))
        reason += f" (whole multiples of the median gap: {missing} missing slice{'s' if missing > 1 else ''})"
    return reason


@contextmanager
def _cyclic_gc_paused():
    """Parsing headers makes tens of thousands of objects and no garbage cycles; collecting while
    they pile up costs about a sixth of the load (reference counting still frees everything)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def load_series(
    files: list[Path],
    *,
    spacing_tolerance: float = 0.01,
    irregular_spacing: Literal["refuse", "process"] = "refuse",
) -> Volume:
    """Load the instances of one series as a volume.

    Each file is read once: pydicom parses the header and locates native pixel data, which is then
    read straight from the file into the volume; compressed pixel data is decoded by pydicom's
    handlers. File reads, decoding and rescaling run in a thread pool. Slices are sorted along the
    normal of the image plane.

    Geometry rules:

    - one orientation and one pixel spacing for every plane (else mixed-orientation / not-a-volume);
    - all planes at one position: refused (not-a-volume), whatever their number;
    - several planes at each position (4D: time points, echoes, b-values, ...): refused
      (not-a-volume) with the layout (positions x planes per position) and the first of
      TemporalPositionIdentifier, EchoNumbers, TriggerTime, AcquisitionNumber, DiffusionBValue
      (or the enhanced per-frame equivalents) whose values tell the planes at each position apart.
      No split: which of the 3D volumes a model wants is for the sender or a routing rule to say,
      not for a guess here. Some positions repeated and others not: refused the same way;
    - gaps between slice centres that differ from the median gap by more than
      ``spacing_tolerance`` (a missing slice, a far slice): refused (irregular-spacing) by default;
      with ``irregular_spacing="process"`` loaded as they are (see below);
    - positions off the line along the normal (gantry tilt): loaded, outcome volume-tilted;
    - instances that each carry their own Frame of Reference UID (an anonymiser's doing, seen in
      public collections) while their positions pass the rules above: loaded as one volume, with a
      note (and a warning in the log) that the results use one derived frame of reference, as for
      a series without one.

    Parameters
    ----------
    files:
        Paths of the series' instances (single-frame or enhanced multi-frame), in any order.
    spacing_tolerance:
        Largest allowed relative deviation of a slice gap from the median gap.
    irregular_spacing:
        ``"refuse"`` (default): irregular gaps raise :class:`NotAVolumeError`. ``"process"``: the
        slices are returned in order at their true positions (``Volume.sources[i].position``, so
        results reference the real slices), ``slice_spacing`` is the median gap, ``outcome`` is
        irregular-spacing and ``Volume.notes`` says which gaps differ and by how much.

    Raises
    ------
    NotAVolumeError
        With the outcome (not-a-volume, irregular-spacing, mixed-orientation) and the reason.
    """
    if irregular_spacing not in ("refuse", "process"):
        raise ValueError(f"irregular_spacing must be 'refuse' or 'process', not {irregular_spacing!r}")
    workers = _workers()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load_series")
    try:
        planes: list[_Plane] = []
        values = _HeaderValues()
        populated = None
        with _cyclic_gc_paused():
            for path in files:
                instance = _read_instance(path, values)
                if populated is None and len(files) > 1:  # the likely volume: every file like the first
                    populated = pool.submit(_populated, (len(files) * instance.shape[0], *instance.shape[1:]))
                planes.extend(_planes_of(instance, values))
                if instance.offset is None:
                    instance.decoded = pool.submit(_decode, instance.dataset, instance.shape)
        from .series import one_series  # series.py builds on Volume

        one_series([p.dataset for p in planes])  # two series in one folder: named, before their geometry clashes
        planes, geometry = _arrange(planes, spacing_tolerance, irregular_spacing)
        geometry["notes"] += _frames_of_reference_notes(planes)
        pixels = _modality_values(planes, pool, workers, populated)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for instance in {id(p.instance): p.instance for p in planes}.values():
        for keyword in PIXEL_KEYWORDS:
            if keyword in instance.dataset:
                delattr(instance.dataset, keyword)  # headers are kept for references; pixels live in the array
    return Volume(
        pixels=pixels,
        sources=[SliceSource(p.dataset, p.frame_number, p.position, p.rescale) for p in planes],
        **geometry,
    )


def _frames_of_reference_notes(planes: list[_Plane]) -> list[str]:
    """A note when instances carry no Frame of Reference UID, or several different ones, logged as a warning.

    Decided here, before any model runs: highdicom refuses sources of several frames of reference,
    and the slices already passed the geometry rules as one volume.
    """
    instances = {id(p.instance): p.dataset for p in planes}.values()
    found = {str(ds.get("FrameOfReferenceUID") or "") for ds in instances} - {""}
    missing = sum(1 for ds in instances if not ds.get("FrameOfReferenceUID"))
    if missing:
        note = (f"{missing} of the series' {len(instances)} instances carry no Frame of Reference UID (required in "
                "the image plane module); the results use one derived frame of reference")
        log.warning("series %s: %s", planes[0].dataset.get("SeriesInstanceUID", "?"), note)
        return [note]
    if len(found) < 2:
        return []
    note = (f"the series' {len(instances)} instances carry {len(found)} different Frame of Reference UIDs"
            + (" (one per slice: an anonymiser's doing)" if len(found) == len(instances) else "")
            + "; their positions form one volume, so the results use one derived frame of reference")
    log.warning("series %s: %s", planes[0].dataset.get("SeriesInstanceUID", "?"), note)
    return [note]


def _arrange(planes: list[_Plane], tolerance: float, irregular_spacing: str) -> tuple[list[_Plane], dict]:
    """The planes sorted along the normal and the volume's geometry, or the reason there is none."""
    if len(planes) < 2:
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"{len(planes)} image plane(s); a volume needs at least 2")
    shapes = {p.instance.shape[1:] for p in planes}
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
        starts = [0, *(np.flatnonzero(gaps >= 1e-3) + 1)]
        if len(starts) == 1:
            raise NotAVolumeError(
                VolumeOutcome.NOT_A_VOLUME,
                f"all {len(planes)} planes lie at one position ({distances[0]:.3f} mm along the normal); "
                "a volume needs planes at 2 or more positions",
            )
        groups = [planes[a:b] for a, b in zip(starts, [*starts[1:], len(planes)], strict=True)]
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, _repeated_positions_reason(groups, [distances[a] for a in starts]))
    median = float(np.median(gaps))
    notes = []
    outcome = VolumeOutcome.VOLUME
    if np.max(np.abs(gaps - median)) > tolerance * median:
        reason = _irregular_spacing_reason(planes, distances, median, tolerance)
        if irregular_spacing == "refuse":
            raise NotAVolumeError(VolumeOutcome.IRREGULAR_SPACING, reason)
        notes.append(reason)
        outcome = VolumeOutcome.IRREGULAR_SPACING
    # positions off the normal line mean a sheared (gantry-tilted) grid
    offsets = (positions - positions[0]) - np.outer(distances - distances[0], normal)
    shear = float(np.max(np.linalg.norm(offsets, axis=1)))
    if shear > 1e-2:
        if outcome is VolumeOutcome.VOLUME:
            outcome = VolumeOutcome.VOLUME_TILTED
        else:
            notes.append(f"slice positions lie up to {shear:.3f} mm off the line along the normal (tilted grid)")
    return planes, {
        "orientation": tuple(float(v) for v in orientation),
        "row_spacing": planes[0].spacing[0],
        "column_spacing": planes[0].spacing[1],
        "slice_spacing": median,
        "slice_thickness": planes[0].thickness,
        "outcome": outcome,
        "notes": notes,
    }
