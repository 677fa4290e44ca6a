"""Which model (if any) a complete series goes to, and why not when none."""

from __future__ import annotations

import re

import numpy as np
from pydicom.dataset import Dataset

from ..config import ModelSettings
from ..records import SeriesRecord

AXES = ("sagittal", "coronal", "axial")  # the patient axis (x, y, z) a plane's normal points along


def plane_orientation(cosines) -> str:
    """axial, coronal or sagittal from Image Orientation (Patient); oblique when no axis dominates."""
    try:
        values = [float(v) for v in cosines]
    except (TypeError, ValueError):
        return ""
    if len(values) != 6:
        return ""
    normal = np.abs(np.cross(values[:3], values[3:]))
    return AXES[int(np.argmax(normal))] if normal.max() >= 0.8 else "oblique"


def _text(header: Dataset, keyword: str) -> str:
    try:
        return str(header.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert
        return ""


def _texts(header: Dataset, keyword: str) -> list[str]:
    try:
        value = header.get(keyword)
    except Exception:  # noqa: BLE001
        return []
    if value in (None, ""):
        return []
    values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    return [str(v).strip().upper() for v in values]


def series_facts(header: Dataset) -> dict:
    """What routing rules look at, from one instance's header (fields of ``SeriesRecord``)."""
    try:
        cosines = header.get("ImageOrientationPatient")
    except Exception:  # noqa: BLE001
        cosines = None
    return {
        "body_part": _text(header, "BodyPartExamined").upper(),
        "series_description": _text(header, "SeriesDescription"),
        "image_type": _texts(header, "ImageType"),
        "mr_acquisition_type": _text(header, "MRAcquisitionType").upper(),
        "scanning_sequence": _texts(header, "ScanningSequence"),
        "orientation": plane_orientation(cosines) if cosines is not None else "",
    }


def match_reason(record: SeriesRecord, model: ModelSettings) -> str:
    """Empty string when the series matches the model's rules, else why it does not.

    Images are counted frame by frame (``record.frames``), so one enhanced multi-frame instance of
    a volume passes ``min_instances``; the reason keeps the words "instance(s), fewer" that
    metrics count by."""
    rule = model.match
    if rule.modalities and record.modality not in rule.modalities:
        return f"modality {record.modality or '(none)'} not in {rule.modalities}"
    if rule.sop_class_uids and record.sop_class_uid not in rule.sop_class_uids:
        return f"SOP class {record.sop_class_uid} not in {rule.sop_class_uids}"
    if rule.body_parts and record.body_part not in rule.body_parts:
        return f"body part {record.body_part or '(none)'} not in {rule.body_parts}"
    if rule.mr_acquisition_types and record.mr_acquisition_type not in rule.mr_acquisition_types:
        return f"MR acquisition type {record.mr_acquisition_type or '(none)'} not in {rule.mr_acquisition_types}"
    missing = [value for value in rule.image_type if value not in record.image_type]
    if missing:
        return f"image type {record.image_type or '(none)'} lacks {missing}"
    if rule.series_description and not re.search(rule.series_description, record.series_description):
        return f"series description {record.series_description or '(none)'!r} does not match {rule.series_description!r}"
    if rule.series_description_exclude and re.search(rule.series_description_exclude, record.series_description):
        return f"series description {record.series_description!r} matches the exclusion {rule.series_description_exclude!r}"
    if rule.orientations and record.orientation not in rule.orientations:
        return f"orientation {record.orientation or '(unknown)'} not in {rule.orientations}"
    images = record.frames or record.instances  # a multi-frame instance counts its frames
    counted = "" if images == record.instances else f" images ({images} frames)"
    if images < (rule.min_instances or 1):
        return f"{record.instances} instance(s), fewer than {rule.min_instances}{counted}"
    if rule.max_instances and images > rule.max_instances:
        return f"{record.instances} instance(s), more than {rule.max_instances}{counted}"
    if rule.calling_aets and record.calling_aet not in rule.calling_aets:
        return f"sender {record.calling_aet} not in {rule.calling_aets}"
    return ""


def route(record: SeriesRecord, models: list[ModelSettings]) -> tuple[list[str], str]:
    """Names of the models whose rules the series matches, and the skip reason when none do."""
    matched, reasons = [], []
    for model in models:
        reason = match_reason(record, model)
        if reason:
            reasons.append(f"{model.name}: {reason}")
        else:
            matched.append(model.name)
    return matched, "" if matched else "; ".join(reasons) or "no models configured"
