"""What a model is given: the ``Series`` of the native ``predict(series)`` contract, and the named
DICOM-derived inputs of the ``inference(...)`` contract other platforms use.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from .volume import NotAVolumeError, Volume, VolumeOutcome

SERIES_INPUTS = (
    "pixel_array", "laterality", "photometric_interpretation", "rescale_intercept", "rescale_slope",
    "slice_thickness", "window_center", "window_width", "pixel_spacing", "image_orientation_patient",
    "image_position_patient", "series_description", "body_part_examined",
)
STUDY_INPUTS = ("chronological_age_months", "patient_sex")
NAMED_INPUTS = SERIES_INPUTS + STUDY_INPUTS

_AGE = re.compile(r"^(\d{3})([DWMY])$")
DAYS_PER_MONTH = 365.2425 / 12


def age_in_months(header: Dataset) -> int | None:
    """Whole months, from Patient's Age (nnnD/W/M/Y), else Study Date minus Patient's Birth Date."""
    match = _AGE.match(str(header.get("PatientAge", "") or "").strip())
    if match:
        number, unit = int(match.group(1)), match.group(2)
        by_unit = {"Y": number * 12, "M": number, "W": int(number * 7 / DAYS_PER_MONTH), "D": int(number / DAYS_PER_MONTH)}
        return by_unit[unit]
    try:
        study = dt.datetime.strptime(str(header.StudyDate), "%Y%m%d").date()
        birth = dt.datetime.strptime(str(header.PatientBirthDate), "%Y%m%d").date()
    except (AttributeError, ValueError):
        return None
    months = (study.year - birth.year) * 12 + (study.month - birth.month) - (study.day < birth.day)
    return months if months >= 0 else None


def _value(header: Dataset, keyword: str):
    """A header value as plain Python: numbers as float, multi-values as lists, empty as None."""
    value = header.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    return _plain(value)


def _plain(value):
    if type(value).__name__ in ("DSfloat", "DSdecimal", "IS", "float", "int"):
        return float(value)
    return str(value)


@dataclass
class Series:
    """One series as a model sees it through the native ``predict(series)`` contract.

    Attributes
    ----------
    pixels:
        (slices, rows, columns) float32 in modality units (HU on CT), slices sorted along the normal.
    spacing:
        (slice, row, column) spacing in mm.
    orientation:
        The six direction cosines (row direction, column direction) of Image Orientation (Patient).
    headers:
        One header per slice, in slice order (pixel data removed).
    """

    volume: Volume

    @property
    def pixels(self) -> np.ndarray:
        return self.volume.pixels

    def source_files(self) -> list[Path]:
        """The series' instance files in slice order (a multi-frame file once), as the loader read
        them: pydicom keeps each dataset's file name.

        Raises
        ------
        ModelRunError
            If the series was loaded from memory, so that no file is known.
        """
        from .outputs import ModelRunError

        files: dict[str, None] = {}
        for source in self.volume.sources:
            name = getattr(source.dataset, "filename", None)
            if not isinstance(name, str) or not name:
                raise ModelRunError("the series' files are not known to the worker (loaded from memory)")
            files.setdefault(name)
        return [Path(name) for name in files]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.volume.slice_spacing, self.volume.row_spacing, self.volume.column_spacing)

    @property
    def orientation(self) -> tuple[float, ...]:
        return self.volume.orientation

    @property
    def headers(self) -> list[Dataset]:
        return [source.dataset for source in self.volume.sources]

    @property
    def first(self) -> Dataset:
        return self.volume.sources[0].dataset

    @cached_property
    def affine(self) -> np.ndarray:
        """4x4 from (slice, row, column) indices to DICOM patient coordinates (LPS, mm)."""
        row_dir, col_dir = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        normal = np.cross(row_dir, col_dir)
        affine = np.eye(4)
        # a row index moves along the column direction; a column index along the row direction
        affine[:3, 0] = normal * self.volume.slice_spacing
        affine[:3, 1] = col_dir * self.volume.row_spacing
        affine[:3, 2] = row_dir * self.volume.column_spacing
        affine[:3, 3] = self.volume.sources[0].position
        return affine

    @property
    def series_uid(self) -> str:
        return self.volume.series_uid

    @property
    def study_uid(self) -> str:
        return self.volume.study_uid

    @property
    def modality(self) -> str:
        return self.volume.modality

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")

    @property
    def patient_age_months(self) -> int | None:
        return age_in_months(self.first)

    @property
    def patient_sex(self) -> str | None:
        return str(self.first.get("PatientSex", "") or "") or None

    def rescale(self) -> list[tuple[float, float]]:
        """(slope, intercept) of each slice, as the loader applied them."""
        return [self.volume.rescale_of(index) for index in range(len(self.volume.sources))]

    def stored_values(self) -> np.ndarray:
        """The pixel values as stored (no rescale), in the stored integer type."""
        rescale = np.array(self.rescale(), dtype=np.float64)
        slopes, intercepts = rescale[:, 0, None, None], rescale[:, 1, None, None]
        stored = np.rint((self.pixels.astype(np.float64) - intercepts) / slopes)
        bits = int(self.first.get("BitsAllocated", 16) or 16)
        signed = int(self.first.get("PixelRepresentation", 0) or 0) == 1
        dtype = np.dtype(f"{'i' if signed else 'u'}{max(1, bits // 8)}") if bits in (8, 16, 32) else np.float32
        return stored.astype(dtype)

    def named_inputs(self, names) -> dict:
        """The values of the named-input contract for ``names`` (see ``NAMED_INPUTS``).

        Series-level values are dicts keyed by Series Instance UID; study-level ones are plain.
        """
        unknown = sorted(set(names) - set(NAMED_INPUTS))
        if unknown:
            raise ValueError(f"unknown named input(s) {unknown}; known: {', '.join(NAMED_INPUTS)}")
        uid, first = self.series_uid, self.first
        rescale = self.rescale()
        makers = {
            "pixel_array": lambda: self.stored_values(),
            "laterality": lambda: _value(first, "Laterality") or _value(first, "ImageLaterality"),
            "photometric_interpretation": lambda: _value(first, "PhotometricInterpretation"),
            "rescale_slope": lambda: _per_series([r[0] for r in rescale]),
            "rescale_intercept": lambda: _per_series([r[1] for r in rescale]),
            "slice_thickness": lambda: self.volume.slice_thickness,
            "window_center": lambda: _value(first, "WindowCenter"),
            "window_width": lambda: _value(first, "WindowWidth"),
            "pixel_spacing": lambda: [self.volume.row_spacing, self.volume.column_spacing],
            "image_orientation_patient": lambda: list(self.orientation),
            "image_position_patient": lambda: [list(s.position) for s in self.volume.sources],
            "series_description": lambda: self.description or None,
            "body_part_examined": lambda: _value(first, "BodyPartExamined"),
        }
        values: dict[str, Any] = {}
        for name in names:
            if name == "chronological_age_months":
                values[name] = self.patient_age_months
            elif name == "patient_sex":
                values[name] = self.patient_sex
            else:
                values[name] = {uid: makers[name]()}
        return values


def one_series(datasets: list[Dataset]) -> None:
    """Refuse the instances of several series given as one (a folder holding two), naming each.

    Raises
    ------
    NotAVolumeError
        Naming each series found: its UID, number, modality, description and instance count.
    """
    found: dict[str, dict[int, Dataset]] = {}
    for ds in datasets:  # the frames of a multi-frame instance share its dataset: counted once
        found.setdefault(str(ds.get("SeriesInstanceUID", "") or "(no Series Instance UID)"), {})[id(ds)] = ds
    if len(found) < 2:
        return
    described = []
    for uid, instances in sorted(found.items(), key=lambda item: -len(item[1])):
        first = next(iter(instances.values()))
        number, modality = first.get("SeriesNumber", ""), str(first.get("Modality", "") or "")
        description = str(first.get("SeriesDescription", "") or "")
        facts = [f"#{number}" if number not in ("", None) else "", modality, f'"{description}"' if description else ""]
        described.append(f"{uid} ({' '.join(f for f in facts if f)}{', ' if any(facts) else ''}"
                         f"{len(instances)} instance(s))")
    raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME,
                          f"{len(found)} series found: {'; '.join(described)}; give the files of one series")


def _per_series(values: list[float]):
    """One value when every slice shares it (the usual case), else the per-slice list."""
    return values[0] if len(set(values)) == 1 else values


@dataclass
class Study:
    """What a model of ``scope: study`` is given: every series of the study its match rule accepted.

    Attributes
    ----------
    series:
        The series that load as volumes, by Series Number (then UID).
    not_volumes:
        Series Instance UID -> why that series did not load as a volume.

    A model's outputs are on the grid of ``series[0]`` unless it returns ``(series, outputs)``
    with the series they are on.
    """

    series: list[Series]
    not_volumes: dict[str, str]

    @property
    def study_uid(self) -> str:
        return self.series[0].volume.study_uid

    def find(self, description: str) -> Series | None:
        """The first series whose Series Description matches a regular expression (case-insensitive)."""
        pattern = re.compile(description, re.IGNORECASE)
        return next((series for series in self.series if pattern.search(series.description)), None)
