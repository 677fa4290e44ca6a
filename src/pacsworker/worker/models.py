"""The model interface the runtime calls, and the registry of built-in models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .volume import Volume


@dataclass(frozen=True)
class CodedTerm:
    """A coded concept (value, scheme designator, meaning), e.g. SNOMED CT ``39607008`` Lung."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentSpec:
    """One label of a model's output and how it is described in DICOM."""

    label: int
    name: str
    category: CodedTerm
    property_type: CodedTerm
    description: str = ""


class SegmentationModel(Protocol):
    """What a model provides: identity, its labels, and a label map for a volume."""

    name: str
    version: str
    segments: tuple[SegmentSpec, ...]

    def predict(self, volume: Volume) -> np.ndarray:
        """Return a label map of ``volume.pixels.shape`` (0 = background, else a segment label)."""
        ...


def builtin_model(source: str, device: str = "auto") -> SegmentationModel:
    """Instantiate a built-in model by name.

    Raises
    ------
    KeyError
        If no built-in model has that name.
    """
    if source == "ct-body":
        from .ct_body import CtBodyModel

        return CtBodyModel(device=device)
    raise KeyError(f"no built-in model named {source!r} (known: ct-body)")
