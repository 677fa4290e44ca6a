"""What a model returns, as plain typed objects; ``worker`` makes them and ``encoders`` writes them.

Nothing here knows a model or a DICOM encoder: both import this module, never each other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset


class ModelOutputError(ValueError):
    """A model returned something its configuration does not allow; the message names the key."""


class ModelRunError(RuntimeError):
    """The model's own code raised while it ran; the message carries what it said."""


def _refuse_positional(cls, message: str):
    """Make a dataclass's generated ``__init__`` refuse positional arguments with ``message``
    (its signature, as ``inspect`` shows it, stays the generated one)."""
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args, **kwargs):
        if args:
            raise TypeError(f"{cls.__name__}{args!r}: {cls.__name__} takes keywords only: {message}")
        generated(self, **kwargs)

    cls.__init__ = __init__
    return cls


@dataclass(frozen=True, kw_only=True)
class CodedTerm:
    """A coded concept, e.g. SNOMED CT 39607008 Lung: ``CodedTerm(scheme="SCT", value="39607008",
    meaning="Lung")``, in the order of the configuration's ``[scheme, value, meaning]``.

    Keywords only: a positional ``CodedTerm("39607008", "SCT", "Lung")`` (the order of earlier
    versions) raises ``TypeError`` instead of coding the wrong concept.
    """

    scheme: str
    value: str
    meaning: str

    @classmethod
    def from_triple(cls, triple) -> CodedTerm:
        """From the configuration's ``[scheme, value, meaning]``, e.g. ``[SCT, "39607008", Lung]``."""
        scheme, value, meaning = (str(part) for part in triple)
        return cls(scheme=scheme, value=value, meaning=meaning)

    def as_json(self) -> list[str]:
        return [self.scheme, self.value, self.meaning]

    def is_probability(self) -> bool:
        """Whether this names a probability (DCM 122157 Probability, 111047 Probability of cancer, or
        any concept whose meaning says probability): its values must lie within 0..1."""
        return (self.scheme, self.value) in PROBABILITY_CODES or "probability" in self.meaning.lower()


_refuse_positional(CodedTerm, "give scheme=, value= and meaning= by keyword, or CodedTerm.from_triple("
                              "[scheme, value, meaning]) in the configuration's order")

PROBABILITY_CODES = {("DCM", "122157"), ("DCM", "111047")}

# distinct colours for labels 1..n (RGB), used when a segment names none
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)

TISSUE = CodedTerm(scheme="SCT", value="85756007", meaning="Tissue")
ANATOMICAL_STRUCTURE = CodedTerm(scheme="SCT", value="123037004", meaning="Anatomical Structure")


@dataclass(frozen=True)
class SegmentSpec:
    """One label of a model's output and how it is described in DICOM."""

    label: int
    name: str
    category: CodedTerm = TISSUE
    property_type: CodedTerm = ANATOMICAL_STRUCTURE
    description: str = ""
    color: tuple[int, int, int] | None = None  # RGB 0..255 for viewers; None: the fixed palette

    def display_color(self) -> tuple[int, int, int]:
        return self.color or PALETTE[(self.label - 1) % len(PALETTE)]


@dataclass(frozen=True)
class ModelIdentity:
    """Who made a result: written into every result object as algorithm name and version."""

    name: str
    version: str


def _check_map(array: np.ndarray, segments, shape: tuple[int, ...], key: str, kind: str) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ModelOutputError(f"output {key!r}: {kind} of shape {tuple(array.shape)}, expected {tuple(shape)}")
    labels = [spec.label for spec in segments]
    if len(set(labels)) != len(labels):
        raise ModelOutputError(f"output {key!r}: segment labels {labels} repeat")


@dataclass
class LabelMap:
    """An exclusive label map of the volume's shape (slices, rows, columns): 0 = background."""

    array: np.ndarray
    segments: tuple[SegmentSpec, ...]

    def check(self, shape: tuple[int, int, int], key: str = "labelmap") -> None:
        """Raise :class:`ModelOutputError` for a map not of the series' shape."""
        _check_map(self.array, self.segments, shape, key, "label map")


@dataclass
class ProbabilityMaps:
    """Per-segment probabilities 0..1, shape (segments, slices, rows, columns), in ``segments`` order."""

    array: np.ndarray
    segments: tuple[SegmentSpec, ...]

    def check(self, shape: tuple[int, int, int], key: str = "probabilities") -> None:
        """Raise :class:`ModelOutputError` for maps of another shape or values outside 0..1."""
        _check_map(self.array, self.segments, (len(self.segments), *shape), key, "probabilities")
        if self.array.size and not (float(np.nanmin(self.array)) >= 0 and float(np.nanmax(self.array)) <= 1
                                    and not np.isnan(self.array).any()):
            raise ModelOutputError(f"output {key!r}: probabilities must lie within 0..1")


def _number(key: str, what: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ModelOutputError(f"output {key!r}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ModelOutputError(f"output {key!r}: {what} is {number}, not a finite number")
    return number


@dataclass
class Score:
    """One number about the series, e.g. DCM 111047 Probability of cancer. A score whose name is a
    probability (:meth:`CodedTerm.is_probability`) must lie within 0..1."""

    value: float
    name: CodedTerm

    def check(self, shape: tuple[int, int, int] | None = None, key: str = "score") -> None:
        """Raise :class:`ModelOutputError` for a value that is no finite number, or a probability outside 0..1."""
        value = _number(key, "a score", self.value)
        if self.name.is_probability() and not 0 <= value <= 1:
            raise ModelOutputError(
                f"output {key!r}: {self.value} is named {self.name.meaning!r} ({self.name.scheme} {self.name.value}), "
                "a probability, but lies outside 0..1"
            )


@dataclass
class Classification:
    """A class the model chose, with its coded meaning when the configuration gives one; ``score``
    (0..1) is reported as the class's Probability."""

    value: int | str
    name: CodedTerm
    meaning: CodedTerm | None = None
    score: float | None = None

    def check(self, shape: tuple[int, int, int] | None = None, key: str = "classification") -> None:
        """Raise :class:`ModelOutputError` for a class that is no number or text, or a score outside 0..1."""
        if not isinstance(self.value, (int, str, float)):
            raise ModelOutputError(f"output {key!r}: a class must be a number or a string, got {type(self.value).__name__}")
        if self.score is not None:
            score = _number(key, "a classification's score", self.score)
            if not 0 <= score <= 1:
                raise ModelOutputError(
                    f"output {key!r}: classification score {self.score} lies outside 0..1 (it is reported as a Probability)"
                )


@dataclass(frozen=True)
class Box:
    """A rectangle on one image of the series, in image coordinates (column, row): (0, 0) is the
    outer corner of the first pixel and (columns, rows) the far corner of the last, so a box
    around pixel (c, r) alone runs from (c, r) to (c + 1, r + 1), as detectors such as torchvision's
    report edges. ``slice`` is the image's index in the series' slice order (``series.pixels[slice]``),
    as the ``"slice"`` key of a box given as a dict; ``slice_index`` is accepted and readable as an alias."""

    slice: int
    top_left: tuple[float, float]
    bottom_right: tuple[float, float]
    label: str
    score: float | None = None
    finding: CodedTerm | None = None  # the label's coded meaning, when the configuration gives one

    @property
    def slice_index(self) -> int:
        """The same as ``slice`` (the field's name before it matched the dict key)."""
        return self.slice


def _accept_slice_index(cls):
    """``Box(slice_index=...)`` keeps working: it is ``slice``; giving both is an error."""
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args, **kwargs):
        if "slice_index" in kwargs:
            alias = kwargs.pop("slice_index")
            if args or "slice" in kwargs:
                raise TypeError("Box: give slice (or its alias slice_index), not both")
            kwargs["slice"] = alias
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


_accept_slice_index(Box)


@dataclass
class Boxes:
    """2D boxes a detector found, each on the image it belongs to."""

    boxes: tuple[Box, ...]

    def check(self, shape: tuple[int, int, int], key: str = "boxes") -> None:
        """Raise :class:`ModelOutputError` for a box off the series' images or with no area."""
        slices, rows, columns = shape
        for number, box in enumerate(self.boxes, start=1):
            (c0, r0), (c1, r1) = box.top_left, box.bottom_right
            if not 0 <= box.slice < slices:
                raise ModelOutputError(f"output {key!r}: box {number} is on slice {box.slice}; the series has {slices}")
            if not (0 <= c0 < c1 <= columns and 0 <= r0 < r1 <= rows):
                raise ModelOutputError(
                    f"output {key!r}: box {number} from {box.top_left} to {box.bottom_right} is not a rectangle "
                    f"within the {columns} x {rows} image (column, row)"
                )
            if box.score is not None and not 0 <= box.score <= 1:
                raise ModelOutputError(f"output {key!r}: box {number} has score {box.score}, outside 0..1")


@dataclass
class DicomObjects:
    """Result objects a model wrote as DICOM itself (a MONAI Deploy application's SEG, SR, ...).

    They bypass pacsworker's encoders but not its validation gate. ``files`` holds whatever else
    the model wrote, by relative path, and ``log`` what it printed: both are kept with the job,
    never delivered.
    """

    datasets: tuple[Dataset, ...]
    files: dict[str, bytes] = field(default_factory=dict)
    log: str = ""


ModelOutput = LabelMap | ProbabilityMaps | Score | Classification | Boxes | DicomObjects


@dataclass
class ModelResult:
    """Everything one run of a model returned, by output key."""

    outputs: dict[str, ModelOutput] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the runtime had to do (e.g. fell back to CPU)

    @property
    def label_maps(self) -> list[LabelMap]:
        return [o for o in self.outputs.values() if isinstance(o, LabelMap)]

    @property
    def probability_maps(self) -> list[ProbabilityMaps]:
        return [o for o in self.outputs.values() if isinstance(o, ProbabilityMaps)]

    @property
    def dicom_objects(self) -> list[DicomObjects]:
        return [o for o in self.outputs.values() if isinstance(o, DicomObjects)]

    @property
    def findings(self) -> list[Score | Classification | Boxes]:
        """The outputs reported in the SR only: scores, classes and boxes."""
        return [o for o in self.outputs.values() if isinstance(o, (Score, Classification, Boxes))]

    def values_json(self) -> dict:
        """Scores, classes, boxes and a summary of each map (voxels per segment of a label map, the
        maximum per segment of probabilities) as JSON, for the job record and the operator."""
        values: dict = {}
        for key, output in self.outputs.items():
            if isinstance(output, Score):
                values[key] = {"kind": "score", "name": output.name.as_json(), "value": float(output.value)}
            elif isinstance(output, Classification):
                values[key] = {
                    "kind": "classification", "name": output.name.as_json(), "value": output.value,
                    "meaning": output.meaning.as_json() if output.meaning else None, "score": output.score,
                }
            elif isinstance(output, LabelMap):
                values[key] = {
                    "kind": "labelmap", "shape": list(output.array.shape),
                    "segments": {s.name: {"label": s.label, "voxels": int(np.count_nonzero(output.array == s.label))}
                                 for s in output.segments},
                }
            elif isinstance(output, ProbabilityMaps):
                values[key] = {
                    "kind": "probabilities", "shape": list(output.array.shape),
                    "segments": {s.name: float(output.array[i].max()) for i, s in enumerate(output.segments)},
                    "note": "maximum probability per segment",
                }
            elif isinstance(output, Boxes):
                values[key] = {"kind": "boxes", "boxes": [
                    {"slice": b.slice, "top_left": list(b.top_left), "bottom_right": list(b.bottom_right),
                     "label": b.label, "score": b.score} for b in output.boxes]}
        if self.notes:
            values["runtime_notes"] = list(self.notes)
        return values
