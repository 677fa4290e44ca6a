"""What a model returns, as plain typed objects; ``worker`` makes them and ``encoders`` writes them.

Nothing here knows a model or a DICOM encoder: both import this module, never each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset


class ModelOutputError(ValueError):
    """A model returned something its configuration does not allow; the message names the key."""


class ModelRunError(RuntimeError):
    """The model's own code raised while it ran; the message carries what it said."""


@dataclass(frozen=True)
class CodedTerm:
    """A coded concept (value, scheme designator, meaning), e.g. SNOMED CT ``39607008`` Lung."""

    value: str
    scheme: str
    meaning: str

    @classmethod
    def from_triple(cls, triple) -> "CodedTerm":
        """From the configuration's ``[scheme, value, meaning]``, e.g. ``[SCT, "39607008", Lung]``."""
        scheme, value, meaning = (str(part) for part in triple)
        return cls(value=value, scheme=scheme, meaning=meaning)

    def as_json(self) -> list[str]:
        return [self.scheme, self.value, self.meaning]


# distinct colours for labels 1..n (RGB), used when a segment names none
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)

TISSUE = CodedTerm("85756007", "SCT", "Tissue")
ANATOMICAL_STRUCTURE = CodedTerm("123037004", "SCT", "Anatomical Structure")


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


@dataclass
class LabelMap:
    """An exclusive label map of the volume's shape (slices, rows, columns): 0 = background."""

    array: np.ndarray
    segments: tuple[SegmentSpec, ...]


@dataclass
class ProbabilityMaps:
    """Per-segment probabilities 0..1, shape (segments, slices, rows, columns), in ``segments`` order."""

    array: np.ndarray
    segments: tuple[SegmentSpec, ...]


@dataclass
class Score:
    """One number about the series, e.g. DCM 111047 Probability of cancer."""

    value: float
    name: CodedTerm


@dataclass
class Classification:
    """A class the model chose, with its coded meaning when the configuration gives one."""

    value: int | str
    name: CodedTerm
    meaning: CodedTerm | None = None
    score: float | None = None


@dataclass(frozen=True)
class Box:
    """A rectangle on one image of the series, in image coordinates (column, row): (0, 0) is the
    outer corner of the first pixel and (columns, rows) the far corner of the last, so a box
    around pixel (c, r) alone runs from (c, r) to (c + 1, r + 1), as detectors such as torchvision's
    report edges. ``slice_index`` is the image's position in the series' slice order."""

    slice_index: int
    top_left: tuple[float, float]
    bottom_right: tuple[float, float]
    label: str
    score: float | None = None
    finding: CodedTerm | None = None  # the label's coded meaning, when the configuration gives one


@dataclass
class Boxes:
    """2D boxes a detector found, each on the image it belongs to."""

    boxes: tuple[Box, ...]

    def check(self, shape: tuple[int, int, int], key: str = "boxes") -> None:
        """Raise :class:`ModelOutputError` for a box off the series' images or with no area."""
        slices, rows, columns = shape
        for number, box in enumerate(self.boxes, start=1):
            (c0, r0), (c1, r1) = box.top_left, box.bottom_right
            if not 0 <= box.slice_index < slices:
                raise ModelOutputError(f"output {key!r}: box {number} is on slice {box.slice_index}; the series has {slices}")
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
        """Scores, classes, boxes and a summary of probability maps as JSON, for the job record and
        the operator (label maps are in the results themselves)."""
        values: dict = {}
        for key, output in self.outputs.items():
            if isinstance(output, Score):
                values[key] = {"kind": "score", "name": output.name.as_json(), "value": float(output.value)}
            elif isinstance(output, Classification):
                values[key] = {
                    "kind": "classification", "name": output.name.as_json(), "value": output.value,
                    "meaning": output.meaning.as_json() if output.meaning else None, "score": output.score,
                }
            elif isinstance(output, ProbabilityMaps):
                values[key] = {
                    "kind": "probabilities", "shape": list(output.array.shape),
                    "segments": {s.name: float(output.array[i].max()) for i, s in enumerate(output.segments)},
                    "note": "maximum probability per segment",
                }
            elif isinstance(output, Boxes):
                values[key] = {"kind": "boxes", "boxes": [
                    {"slice": b.slice_index, "top_left": list(b.top_left), "bottom_right": list(b.bottom_right),
                     "label": b.label, "score": b.score} for b in output.boxes]}
        if self.notes:
            values["runtime_notes"] = list(self.notes)
        return values
