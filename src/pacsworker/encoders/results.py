"""A model's outputs over a volume become one DICOM SEG and one Comprehensive 3D SR (TID 1500).

The first label map or probability map becomes the SEG; the SR reports each segment's volume,
intensity and longest diameter, every score and classification (TID 1501 groups), and every 2D
box as a planar ROI on its image. Without a map, the SR alone carries the findings.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag

from .. import __version__
from ..config import SegOptions
from ..worker.outputs import (
    Box,
    Boxes,
    Classification,
    CodedTerm,
    LabelMap,
    ModelIdentity,
    ModelOutput,
    ModelResult,
    ProbabilityMaps,
    Score,
    SegmentSpec,
)
from ..worker.volume import PIXEL_KEYWORDS, Volume
from .measures import Diameter, longest_diameter
from .uids import result_uid

log = logging.getLogger(__name__)

MANUFACTURER = "pacsworker"
LONG_AXIS = CodedConcept("103339001", "SCT", "Long axis")
MILLIMETER = CodedConcept("mm", "UCUM", "millimeter")
MR_SIGNAL = CodedConcept("110852", "DCM", "MR signal intensity")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
STANDARD_DEVIATION = CodedConcept("386136009", "SCT", "Standard Deviation")

MILLILITER = CodedConcept("ml", "UCUM", "milliliter")
HOUNSFIELD_UNIT = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
ATTENUATION = CodedConcept("112031", "DCM", "Attenuation Coefficient")
TYPE2_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
)
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
FINDING = CodedConcept("404684003", "SCT", "Finding")
# a private coding scheme (PS3.16 8.2) for labels a model's configuration leaves uncoded, and for
# the outcome of pacsworker's own plausibility checks
PRIVATE_SCHEME = "99PACSWORKER"
PLAUSIBILITY_CHECK = CodedConcept("PLAUSIBILITY", PRIVATE_SCHEME, "Plausibility check")
_PIXEL_TAGS = {tag_for_keyword(keyword) for keyword in PIXEL_KEYWORDS}
# the results' date and time when the source carries none at all (dates removed by anonymisation)
UNKNOWN_DATETIME = ("19000101", "000000")


@dataclass(frozen=True)
class SegmentStatistics:
    """Per-segment numbers reported in the SR; ``mean_value`` is in modality units (HU on CT)."""

    spec: SegmentSpec
    segment_number: int
    voxels: int
    volume_ml: float
    mean_value: float
    sd_value: float = 0.0
    diameter: Diameter | None = None


@dataclass(frozen=True)
class EncodedResults:
    """The result objects of one job, and the statistics: the SEG (when the model returned a map
    with a segment), the measurement SR (volumes, intensities, classes, scores) and the image SR
    (lengths and boxes on source images); each only when it has something to say."""

    seg: Dataset | None
    sr: Dataset | None
    statistics: tuple[SegmentStatistics, ...]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: statistics_s, seg_s, sr_s
    image_sr: Dataset | None = None

    def objects(self) -> list[tuple[str, Dataset]]:
        """(role, object) of every object written, in delivery order: seg, sr, image_sr."""
        return [(role, ds) for role, ds in (("seg", self.seg), ("sr", self.sr), ("image_sr", self.image_sr))
                if ds is not None]


def _concept(term: CodedTerm) -> CodedConcept:
    return CodedConcept(term.value, term.scheme, term.meaning)


def _private_concept(text: str) -> CodedConcept:
    """A label or class value the configuration gives no code for, in the private scheme."""
    text = str(text).strip() or "unnamed"
    return CodedConcept(text.replace("\\", "/")[:64], PRIVATE_SCHEME, text[:64])


def present_segments(labels: np.ndarray, segments: tuple[SegmentSpec, ...]) -> list[tuple[SegmentSpec, int]]:
    """The segments that have voxels, with their SEG segment numbers 1..N in the map's segment order."""
    if labels.dtype.kind in "ui" and labels.size and int(labels.min()) >= 0:
        counts = np.bincount(labels.ravel())
        found = [spec for spec in segments if spec.label < len(counts) and counts[spec.label]]
    else:
        values = set(np.unique(labels).tolist())
        found = [spec for spec in segments if spec.label in values]
    return [(spec, number) for number, spec in enumerate(found, start=1)]


def segment_statistics(
    volume: Volume, labels: np.ndarray, segments: list[tuple[SegmentSpec, int]]
) -> list[SegmentStatistics]:
    """Statistics of the present segments (``present_segments``), under their SEG numbers."""
    found = []
    for spec, number in segments:
        mask = labels == spec.label
        voxels = int(mask.sum())
        values = volume.pixels[mask]
        found.append(
            SegmentStatistics(
                spec, number, voxels, voxels * volume.voxel_volume_ml, float(values.mean()),
                float(values.std()), longest_diameter(mask, volume.row_spacing, volume.column_spacing),
            )
        )
    return found


def result_series(volume: Volume, model: ModelIdentity) -> tuple[int, int, int, str]:
    """SEG, measurement SR and image SR series numbers, and the source's name for descriptions.

    Numbers derive from the source's Series Number and the model name, so two results of
    different source series (or of two models on one series) never share a number, and a re-run
    keeps its numbers: source N gives N * 100 + 3k + 1 (SEG), + 2 (SR) and + 3 (image SR), k
    (0..32) from the model name.
    """
    first = volume.sources[0].dataset
    try:
        number = int(first.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    k = int.from_bytes(hashlib.sha256(model.name.encode()).digest()[:4], "big") % 33
    seg_number = (number % 20_000_000) * 100 + 3 * k + 1
    description = str(first.get("SeriesDescription", "") or "").strip()
    source = f"{description} (series {number})" if description else f"series {number}"
    return seg_number, seg_number + 1, seg_number + 2, source


def _described(kind: str, model: ModelIdentity, source: str) -> str:
    """``<model> <kind> of <source description> (series N)``, within the 64 characters of LO."""
    text = f"{model.name} {kind} of {source}"
    return text if len(text) <= 64 else text[:61] + "..."


def _header_copy(source: Dataset) -> Dataset:
    """A copy of a source's header without its pixel data that shares nothing mutable with it: what
    the encoder fixes in it never reaches the volume's own datasets (``copy.copy`` of a Dataset
    shares its element dictionary).

    Elements pydicom has not converted yet are immutable tuples of raw bytes and are shared;
    converted ones are copied, sequences and multi-values deeply. Measured on headers as the loader
    leaves them (125 elements each): 270 ms per 500 slices, against 1.6 s for ``copy.deepcopy``.
    """
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for tag in source.keys():
        if tag in _PIXEL_TAGS:
            continue
        element = source.get_item(tag, keep_deferred=True)
        if type(element) is not RawDataElement:
            mutable = element.VR == "SQ" or isinstance(element.value, MultiValue)
            element = copy.deepcopy(element) if mutable else copy.copy(element)
        elements[tag] = element
    header = Dataset(elements)
    if getattr(source, "file_meta", None) is not None:
        header.file_meta = copy.deepcopy(source.file_meta)
    return header


def _sanitized(source: Dataset) -> Dataset:
    """A header copy without attributes some scanners send empty though the standard forbids it."""
    ds = _header_copy(source)
    if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
        del ds.SpecificCharacterSet
    age = str(ds.get("PatientAge", "") or "")
    if age and not re.fullmatch(r"\d{3}[DWMY]", age):
        match = re.fullmatch(r"(\d{1,3})([DWMY])", age.strip())
        if match:
            ds.PatientAge = f"{int(match[1]):03d}{match[2]}"
        else:
            del ds.PatientAge  # type 3 and unusable as sent
    for keyword in TYPE2_ATTRIBUTES:
        if keyword not in ds:
            setattr(ds, keyword, None)  # type 2: present, empty when unknown
    if "PerFrameFunctionalGroupsSequence" in ds:
        # geometry that varies per frame only formally (load_series checked it is uniform) is
        # moved to the shared groups, where highdicom reads it
        shared = copy.deepcopy(ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0])
        first = ds.PerFrameFunctionalGroupsSequence[0]
        for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
            if keyword not in shared and keyword in first:
                setattr(shared, keyword, copy.deepcopy(first[keyword].value))
        ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _geometry(volume: Volume) -> dict:
    """Plane geometry from the loaded volume, for multi-frame sources, whose per-frame functional
    groups vary in what they hold. Single-frame sources carry it in their headers, which the
    encoder has made consistent (orientation, slice thickness); highdicom reads it from them
    faster than it matches given plane positions back to the sources."""
    if all(source.frame_number is None for source in volume.sources):
        return {}
    return {
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=(volume.row_spacing, volume.column_spacing),
            slice_thickness=volume.slice_thickness or volume.slice_spacing,
            spacing_between_slices=volume.slice_spacing,
        ),
        "plane_orientation": hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=volume.orientation
        ),
        "plane_positions": [hd.PlanePositionSequence("PATIENT", s.position) for s in volume.sources],
    }


def exclusive_labels(maps: ProbabilityMaps, threshold: float) -> LabelMap:
    """Probabilities as a label map viewers accept: where several segments pass the threshold, the
    most probable one takes the voxel (no overlaps)."""
    above = maps.array >= threshold
    best = np.argmax(np.where(above, maps.array, -1.0), axis=0)
    labels = np.zeros(maps.array.shape[1:], dtype=np.uint8)
    anywhere = above.any(axis=0)
    lookup = np.array([s.label for s in maps.segments], dtype=np.uint8)
    labels[anywhere] = lookup[best[anywhere]]
    return LabelMap(labels, maps.segments)


@dataclass(frozen=True)
class EarlierReport:
    """The SR an earlier run of the same model wrote for the same series (its predecessor)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.88.34"


def encode_results(volume: Volume, outputs: ModelResult | ModelOutput | list[ModelOutput], model: ModelIdentity,
                   options: SegOptions | None = None,
                   predecessor: EarlierReport | dict[str, EarlierReport] | None = None,
                   flags: list[str] | None = None, inputs: str = "", provenance: str = "") -> EncodedResults | None:
    """Build the SEG and the SR for one model run; ``None`` when there is nothing to report (no
    segment found, and no score, class or box).

    A label map becomes a BINARY SEG (or LABELMAP when asked); probability maps a FRACTIONAL SEG
    (PROBABILITY, 8 bits), or binarized at the threshold. The SR's statistics of probability maps
    are of the voxels at or above the threshold. Volumes, intensities, scores and classifications
    go in the measurement SR; longest diameters and boxes in the image SR. A ``predecessor`` (an
    earlier run's SR with other UIDs; a dict by role, ``sr`` and ``image_sr``, for both) is named in
    the new SR's Predecessor Documents Sequence. ``flags`` are failed plausibility checks of a
    result delivered anyway: the measurement SR states each as a qualitative evaluation, and every
    series description says so. ``inputs`` names what else the model was given (a study model's
    other series): other inputs give other result UIDs, as other flags do. ``provenance`` names
    everything else that can change the result (the settings' fingerprint, the digest of the
    model's files: ``runtime.result_provenance``): another provenance gives other result UIDs.

    The same inputs, model and provenance give the same bytes: dates and times are the source's
    (:func:`result_datetime`), and every UID derives from them (:func:`~.uids.result_uid`). The
    volume's own source headers are never changed: the encoder's fixes go to deep copies.

    Raises
    ------
    ValueError
        If a map or a box does not fit the volume, or highdicom rejects the objects.
    """
    options = options or SegOptions()
    if isinstance(outputs, ModelResult):
        outputs = list(outputs.outputs.values())
    elif not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    maps = [o for o in outputs if isinstance(o, (LabelMap, ProbabilityMaps))]
    findings = [o for o in outputs if isinstance(o, (Score, Classification, Boxes))]
    output = maps[0] if maps else None
    if isinstance(output, ProbabilityMaps) and options.probabilities_as == "binary":
        output = exclusive_labels(output, options.threshold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _encode(volume, output, findings, model, options, list(flags or []), inputs, provenance)
    earlier = predecessor if isinstance(predecessor, dict) else {"sr": predecessor} if predecessor else {}
    for role, ds in results.objects() if results is not None else []:
        report = earlier.get(role)
        if role != "seg" and report is not None and report.sop_instance_uid != ds.SOPInstanceUID:
            ds.PredecessorDocumentsSequence = [_hierarchical_reference(report)]
    if caught:
        log.info("series %s: %d encoder warning(s) about source attributes: %s", volume.series_uid, len(caught),
                 "; ".join(encoder_warnings(caught, volume.source_datasets[:1])))
    return results


# attributes whose values never reach a log line, quoted or not
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
                     "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers")
_NOT_TEXT = ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN")
_QUOTED = re.compile(r"(\"[^\"]*\"|'[^']*')")


def encoder_warnings(caught: list[warnings.WarningMessage], sources: list[Dataset]) -> list[str]:
    """Each distinct warning once, with its category and how often it came, without values.

    highdicom quotes the value it warns about (a one-component Patient's Name): a quoted value
    becomes the keyword of the source attribute that holds it (``<PatientName>``), or ``<a value>``;
    patient attributes' values are removed even unquoted. Only the first sentence is kept.
    """
    holders: dict[str, list[str]] = {}
    for ds in sources:
        for tag in ds.keys():
            try:
                element = ds[tag]
                if element.keyword and element.VR not in _NOT_TEXT and element.value not in (None, ""):
                    holders.setdefault(str(element.value).strip(), []).append(element.keyword)
            except Exception:  # noqa: BLE001 - a value pydicom cannot convert is not what a warning quotes
                continue

    def unquoted(match: re.Match) -> str:
        keywords = holders.get(match.group(0)[1:-1].strip())
        return f"<{'/'.join(dict.fromkeys(keywords))}>" if keywords else "<a value>"

    counts: dict[str, int] = {}
    for warning in caught:
        text = _QUOTED.sub(unquoted, str(warning.message))
        for ds in sources:
            for keyword in _PATIENT_KEYWORDS:
                value = str(ds.get(keyword, "") or "").strip()
                if len(value) > 1:
                    text = text.replace(value, f"<{keyword}>")
        text = re.split(r"(?<=\.)\s+(?=[A-Z])", text.strip(), maxsplit=1)[0].rstrip(".")[:240]
        key = f"{text} ({warning.category.__name__}"
        counts[key] = counts.get(key, 0) + 1
    return [f"{key}{f', {n} times' if n > 1 else ''})" for key, n in counts.items()]


def _has_content(finding) -> bool:
    return not isinstance(finding, Boxes) or bool(finding.boxes)


def _encode(volume: Volume, output: LabelMap | ProbabilityMaps | None, findings: list, model: ModelIdentity,
            options: SegOptions, flags: list[str], inputs: str = "", provenance: str = "") -> EncodedResults | None:
    segments: list[tuple[SegmentSpec, int]] = []
    if output is not None:
        labels = exclusive_labels(output, options.threshold).array if isinstance(output, ProbabilityMaps) else output.array
        if labels.shape != volume.pixels.shape:
            raise ValueError(f"label map shape {labels.shape} differs from the volume's {volume.pixels.shape}")
        segments = present_segments(labels, output.segments)
    findings = [f for f in findings if _has_content(f)]
    if not segments and not findings:
        return None
    for finding in findings:
        if isinstance(finding, Boxes):
            finding.check(volume.pixels.shape)
    instance_uids = [str(ds.SOPInstanceUID) for ds in volume.source_datasets]

    # flagged objects differ from unflagged ones of the same run: they must not share UIDs with them
    variant = model.version + ("|flagged:" + hashlib.sha256("\n".join(flags).encode()).hexdigest()[:16] if flags else "")
    # results of a model given more than this series (a study model) depend on the others too
    variant += f"|inputs:{inputs}" if inputs else ""
    # other settings or other model files may give other content: never under the same UIDs
    variant += f"|provenance:{provenance}" if provenance else ""

    def uid(role: str) -> str:
        return result_uid(volume.series_uid, instance_uids, model.name, variant, role)

    sources = [_sanitized(ds) for ds in volume.source_datasets]
    for ds in sources:
        if "PerFrameFunctionalGroupsSequence" not in ds and not ds.get("SliceThickness"):
            ds.SliceThickness = volume.slice_spacing  # required in the SEG's pixel measures
        if "ImageOrientationPatient" in ds:
            # the loader accepted cosines equal within 1e-3; highdicom compares them exactly
            ds.ImageOrientationPatient = list(volume.orientation)
    if volume.frame_of_reference_uid is None:
        # no Frame of Reference UID (type 1 in the image plane module), or one per slice (the loader
        # said so in the volume's notes): one derived UID keeps the SEG valid and all its frames in
        # one frame of reference. It depends on the source alone: every result on the series shares it
        derived = result_uid(volume.series_uid, instance_uids, "", "", "frame-of-reference")
        for ds in sources:
            ds.FrameOfReferenceUID = derived
    software = [__version__, f"{model.name} {model.version}"]
    seg_number, sr_number, image_number, source_name = result_series(volume, model)
    seg, stats, timings = None, [], {}
    if segments:
        # the statistics are numpy work that releases the GIL: they run beside the SEG's
        # construction, which is Python work
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="statistics") as pool:
            computing = pool.submit(_timed, segment_statistics, volume, labels, segments)
            started = time.perf_counter()
            seg = _segmentation(volume, sources, output, labels, segments, model, options, uid, software)
            seg.SeriesNumber = seg_number
            seg.SeriesDescription = _described("SEG" + (" [implausible]" if flags else ""), model, source_name)
            timings["seg_s"] = time.perf_counter() - started
            stats, timings["statistics_s"] = computing.result()
    started = time.perf_counter()
    flagged = " [implausible]" if flags else ""
    sr, image_sr = _reports(volume, sources, seg, stats, findings, model, uid, software, flags)
    if sr is not None:
        sr.SeriesNumber = sr_number
        sr.SeriesDescription = _described(("measurements" if stats else "findings") + flagged, model, source_name)
    if image_sr is not None:
        kinds = ["lengths" if any(s.diameter for s in stats) else "", "boxes" if _box_count(findings) else ""]
        image_sr.SeriesNumber = image_number
        image_sr.SeriesDescription = _described(" and ".join(k for k in kinds if k) + flagged, model, source_name)
    timings["sr_s"] = time.perf_counter() - started
    when = result_datetime(volume)
    for result in (seg, sr, image_sr):
        if result is not None:
            _dated(result, when)
    if seg is not None:
        _dimension_organization(seg, uid("dimension-organization"))
    return EncodedResults(seg=seg, sr=sr, image_sr=image_sr, statistics=tuple(stats), timings=timings)


def result_datetime(volume: Volume) -> tuple[str, str]:
    """(date, time) the results carry as content, series and instance creation date and time.

    The source's, not the clock's: the newest Content Date and Time of the source instances (the
    series' last image), else the series' Series Date and Time, else the study's; a date without a
    time counts as midnight; with no date at all, ``UNKNOWN_DATETIME``. So a re-run writes the
    same bytes under the same UIDs, and results sort beside the images they were made from. When
    a job ran is in its record.
    """
    def moment(date, time_) -> tuple[str, str] | None:
        date = str(date or "").strip()
        if not re.fullmatch(r"\d{8}", date):
            return None
        time_ = str(time_ or "").strip()
        return date, time_ if re.fullmatch(r"\d{2,6}(\.\d{1,6})?", time_) else "000000"

    def order(found: tuple[str, str]) -> tuple[str, str]:
        whole, _, fraction = found[1].partition(".")
        return found[0], whole.ljust(6, "0") + "." + fraction.ljust(6, "0")

    contents = [m for ds in volume.source_datasets if (m := moment(ds.get("ContentDate"), ds.get("ContentTime")))]
    if contents:
        return max(contents, key=order)
    first = volume.source_datasets[0]
    return (moment(first.get("SeriesDate"), first.get("SeriesTime"))
            or moment(first.get("StudyDate"), first.get("StudyTime")) or UNKNOWN_DATETIME)


def _dated(ds: Dataset, when: tuple[str, str]) -> None:
    """The object's dates and times (highdicom writes the clock's) set to ``when``."""
    date, time_ = when
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time_
    ds.ContentDate, ds.ContentTime = date, time_
    ds.SeriesDate, ds.SeriesTime = date, time_
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom" and "ContributionDateTime" in item:
            item.ContributionDateTime = date + time_


def _dimension_organization(seg: Dataset, uid: str) -> None:
    """The SEG's Dimension Organization UID (highdicom makes a random one) replaced by ``uid``."""
    old = {str(item.DimensionOrganizationUID) for item in seg.get("DimensionOrganizationSequence", [])}
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(keyword, []):
            if str(item.get("DimensionOrganizationUID", "")) in old:
                item.DimensionOrganizationUID = uid


def _box_count(findings: list) -> int:
    return sum(len(f.boxes) for f in findings if isinstance(f, Boxes))


def _timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def _segmentation(volume, sources, output, labels, segments, model, options, uid, software) -> Dataset:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name, family=codes.cid7162.ArtificialIntelligence, version=model.version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.name,
            segmented_property_category=_concept(spec.category),
            segmented_property_type=_concept(spec.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=uid(f"tracking-{spec.label}"),
            tracking_id=spec.name,
            display_color=hd.color.CIELabColor.from_rgb(*spec.display_color()),
        )
        for spec, number in segments
    ]
    extra: dict[str, Any]  # Segmentation's arguments of one segmentation type
    if isinstance(output, ProbabilityMaps):
        index = {spec.label: i for i, spec in enumerate(output.segments)}
        pixels = np.stack([output.array[index[spec.label]] for spec, _ in segments], axis=-1).astype(np.float32)
        kind, extra = hd.seg.SegmentationTypeValues.FRACTIONAL, {
            "fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY, "max_fractional_value": 255}
    else:
        numbered = all(spec.label == number for spec, number in segments)
        if numbered and labels.dtype == np.uint8 and int(labels.max()) <= len(segments):
            pixels = labels  # already numbered as the SEG's segments
        else:
            lookup = np.zeros(max(int(labels.max()), max(spec.label for spec, _ in segments)) + 1, dtype=np.uint8)
            for spec, number in segments:
                lookup[spec.label] = number
            pixels = lookup[labels]
        labelmap = options.labelmap_as == "labelmap"
        kind, extra = (hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY), {}
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=kind,
        **extra,
        segment_descriptions=descriptions,
        series_instance_uid=uid("seg-series"),
        series_number=1,  # set by the caller
        sop_instance_uid=uid("seg-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=software,
        device_serial_number="0",
        content_description=f"{model.name} {model.version} segmentation",
        content_label="SEGMENTATION",
        content_creator_name="pacsworker^" + model.name,
        **_geometry(volume),
    )


def _hierarchical_reference(report: EarlierReport) -> Dataset:
    instance = Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = report.sop_class_uid, report.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedSOPSequence = report.series_uid, [instance]
    study = Dataset()
    study.StudyInstanceUID, study.ReferencedSeriesSequence = report.study_uid, [series]
    return study


# the Tracking Identifier text OHIF (3.x) needs to take a length over as its own measurement;
# cornerstone's tools write it, and OHIF reads back only what they would have written
OHIF_LENGTH = "Cornerstone3DTools@^0.1.0:Length"


def _long_axis_group(volume: Volume, s: SegmentStatistics, algorithm, uid):
    """The longest in-plane diameter as a length (TID 1501, DCM 125007): its NUM is INFERRED FROM an
    image-region SCOORD POLYLINE of its two end points on the source image where it lies, the way
    viewers' own length tools write it, so OHIF lists it in its measurement panel."""
    diameter = s.diameter
    if diameter is None:
        raise ValueError(f"segment {s.spec.name} has no diameter to report")
    image = _source_image(volume, diameter.slice_index)
    # image coordinates are (column, row), (0, 0) the outer corner of the first pixel
    points = np.array([[diameter.start[1] + 0.5, diameter.start[0] + 0.5],
                       [diameter.end[1] + 0.5, diameter.end[0] + 0.5]], dtype=np.float32)
    length = hd.sr.Measurement(name=LONG_AXIS, value=round(diameter.length_mm, 3), unit=MILLIMETER,
                               algorithm_id=algorithm)
    region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=points, source_image=image)
    region.RelationshipType = "INFERRED FROM"
    number = length[0]
    if "ContentSequence" not in number:
        number.ContentSequence = hd.sr.ContentSequence([], is_root=False)
    number.ContentSequence.append(region)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid(f"long-axis-{s.spec.label}"), identifier=OHIF_LENGTH),
        finding_type=_concept(s.spec.property_type),
        finding_category=_concept(s.spec.category),
        algorithm_id=algorithm,
        measurements=[length],
    )


def _source_image(volume: Volume, slice_index: int) -> hd.sr.SourceImageForRegion:
    source = volume.sources[slice_index]
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=str(source.dataset.SOPClassUID),
        referenced_sop_instance_uid=str(source.dataset.SOPInstanceUID),
        referenced_frame_numbers=[source.frame_number] if source.frame_number else None,
    )


def _probability(value: float, algorithm) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=PROBABILITY, value=round(float(value), 6), unit=NO_UNITS, algorithm_id=algorithm)


def _box_group(volume: Volume, box: Box, number: int, algorithm, uid):
    """A box as a planar ROI: a closed POLYLINE rectangle on its image, its label as finding type
    and tracking identifier, its score as a probability."""
    (c0, r0), (c1, r1) = box.top_left, box.bottom_right
    corners = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float32)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid(f"box-{number}"), identifier=f"{box.label} {number}"),
        referenced_region=hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=corners,
                                            source_image=_source_image(volume, box.slice_index)),
        finding_type=_concept(box.finding) if box.finding else _private_concept(box.label),
        finding_category=FINDING,
        algorithm_id=algorithm,
        measurements=[_probability(box.score, algorithm)] if box.score is not None else None,
    )


def _box_groups(volume: Volume, findings: list, algorithm, uid) -> list:
    boxes = [box for finding in findings if isinstance(finding, Boxes) for box in finding.boxes]
    return [_box_group(volume, box, number, algorithm, uid) for number, box in enumerate(boxes, start=1)]


def _finding_groups(findings: list, algorithm, uid) -> list:
    """Classifications and scores: study-level findings without image coordinates."""
    groups = []
    for index, finding in enumerate(findings):
        if isinstance(finding, Classification):
            value = _concept(finding.meaning) if finding.meaning else _private_concept(str(finding.value))
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid(f"class-{index}"),
                                                             identifier=finding.name.meaning),
                algorithm_id=algorithm,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_concept(finding.name), value=value)],
                measurements=[_probability(finding.score, algorithm)] if finding.score is not None else None,
            ))
        elif isinstance(finding, Score):
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid(f"score-{index}"),
                                                             identifier=finding.name.meaning),
                algorithm_id=algorithm,
                measurements=[hd.sr.Measurement(name=_concept(finding.name), value=round(float(finding.value), 6),
                                                unit=NO_UNITS, algorithm_id=algorithm)],
            ))
    return groups


def _plausibility_group(flags: list[str], algorithm, uid):
    """Failed plausibility checks, stated where every reader of the SR sees them: one qualitative
    evaluation per failed check, its meaning the check's sentence (within LO's 64 characters)."""
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=PLAUSIBILITY_CHECK,
            value=CodedConcept(f"FAILED-{number}", PRIVATE_SCHEME, ("Failed: " + text)[:64]),
        )
        for number, text in enumerate(flags, start=1)
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("plausibility"), identifier="Plausibility checks"),
        algorithm_id=algorithm,
        qualitative_evaluations=evaluations,
    )


def _report(volume, groups, evidence, role: str, model, uid, software) -> Dataset:
    """One TID 1500 Measurement Report in a Comprehensive 3D SR of its own series."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid("observer-device"), name=model.name, manufacturer_name=MANUFACTURER, model_name=model.version
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uid(f"{role}-series"),
        series_number=1,  # set by the caller
        sop_instance_uid=uid(f"{role}-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SoftwareVersions = software
    return sr


def _volume_groups(volume, seg, stats, algorithm, uid) -> list:
    groups = []
    for s in stats:
        intensity, unit = (ATTENUATION, HOUNSFIELD_UNIT) if volume.modality == "CT" else (MR_SIGNAL, NO_UNITS)
        measurements = [
            hd.sr.Measurement(name=codes.SCT.Volume, value=round(s.volume_ml, 6), unit=MILLILITER,
                              algorithm_id=algorithm),
            hd.sr.Measurement(name=intensity, value=round(s.mean_value, 3), unit=unit,
                              derivation=codes.SCT.Mean, algorithm_id=algorithm),
            hd.sr.Measurement(name=intensity, value=round(s.sd_value, 3), unit=unit,
                              derivation=STANDARD_DEVIATION, algorithm_id=algorithm),
        ]
        if volume.modality != "CT" and volume.modality != "MR":
            measurements = measurements[:1]  # no agreed intensity concept for other modalities
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid(f"tracking-{s.spec.label}"), identifier=s.spec.name),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=s.segment_number,
                    source_series=hd.sr.SourceSeriesForSegmentation(volume.series_uid),
                ),
                finding_type=_concept(s.spec.property_type),
                finding_category=_concept(s.spec.category),
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
    return groups


def _reports(volume, sources, seg, stats, findings, model, uid, software, flags=()) -> tuple[Dataset | None, Dataset | None]:
    """The measurement report (volumes and intensities of the SEG's segments, classes, scores,
    failed plausibility checks) and the image report (lengths and boxes on source images).

    Two documents, because OHIF 3 stops loading an SR at the first measurement group without
    image coordinates: the image report holds only groups it can show.
    """
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    groups = _volume_groups(volume, seg, stats, algorithm, uid) + _finding_groups(findings, algorithm, uid)
    if flags:
        groups.append(_plausibility_group(list(flags), algorithm, uid))
    on_images = [_long_axis_group(volume, s, algorithm, uid) for s in stats if s.diameter is not None]
    on_images += _box_groups(volume, findings, algorithm, uid)
    measurements = _report(volume, groups, [seg, *sources] if seg is not None else sources, "sr", model, uid,
                           software) if groups else None
    images = _report(volume, on_images, sources, "image-sr", model, uid, software) if on_images else None
    return measurements, images
