"""The gate before delivery: result objects must reference what exists and sit where their sources are.

highdicom checks each object's attributes while building it; this checks what it cannot know:
every instance a SEG or SR references is in the source series (or is the job's own SEG), every
SEG frame lies at the position of the source image it was derived from, and, where dicom3tools'
``dciodvfy`` is installed, that this IOD validator reports no error. Objects a model wrote itself
(MONAI Deploy applications) pass the same checks, and must also belong to the source study.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ..records import is_valid_uid
from ..worker.volume import Volume

POSITION_TOLERANCE_MM = 1e-3
SEG_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}  # binary/fractional, label map


def _referenced_instances(ds: Dataset) -> set[str]:
    """SOP Instance UIDs in the object's series-level reference sequences."""
    found = set()
    for keyword in ("ReferencedSeriesSequence", "CurrentRequestedProcedureEvidenceSequence"):
        for item in ds.get(keyword, []):
            series = item.get("ReferencedSeriesSequence", [item]) if keyword != "ReferencedSeriesSequence" else [item]
            for series_item in series:
                instances = series_item.get("ReferencedInstanceSequence", []) or series_item.get("ReferencedSOPSequence", [])
                for instance in instances:
                    found.add(str(instance.ReferencedSOPInstanceUID))
    return found


Positions = dict[tuple[str, "int | None"], tuple[float, float, float]]


def _source_positions(volume: Volume) -> Positions:
    """Each source image (instance UID, frame number) and where it lies (mm)."""
    return {(str(s.dataset.SOPInstanceUID), s.frame_number): s.position for s in volume.sources}


def referential_problems(volume: Volume, seg: Dataset | None, sr: Dataset | None,
                         image_sr: Dataset | None = None) -> list[str]:
    """What the SEG and the SRs reference that the source series does not hold, or holds elsewhere."""
    positions = _source_positions(volume)
    source_uids = {uid for uid, _ in positions}
    problems = []
    if image_sr is not None:
        foreign = _referenced_instances(image_sr) - source_uids
        if foreign:
            problems.append(f"image SR references {len(foreign)} instance(s) not in the source series")
    if sr is None:
        return problems
    if seg is None:
        foreign = _referenced_instances(sr) - source_uids
        return problems + ([f"SR references {len(foreign)} instance(s) not in the source series"] if foreign else [])
    problems += seg_problems(seg, positions)
    foreign = _referenced_instances(sr) - source_uids - {str(seg.SOPInstanceUID)}
    if foreign:
        problems.append(f"SR references {len(foreign)} instance(s) that are neither the SEG nor in the source series")
    if str(seg.SOPInstanceUID) not in _referenced_instances(sr):
        problems.append("SR does not list the SEG among its evidence")
    return problems


def seg_problems(seg: Dataset, positions: Positions) -> list[str]:
    """What a SEG references that the source series does not hold, and frames away from their sources."""
    source_uids = {uid for uid, _ in positions}
    problems = []
    foreign = _referenced_instances(seg) - source_uids
    if foreign:
        problems.append(f"SEG references {len(foreign)} instance(s) not in the source series, e.g. {sorted(foreign)[0]}")
    for number, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        try:
            source = frame.DerivationImageSequence[0].SourceImageSequence[0]
            uid = str(source.ReferencedSOPInstanceUID)
            frame_number = int(source.ReferencedFrameNumber) if "ReferencedFrameNumber" in source else None
            position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        except (AttributeError, IndexError, TypeError, ValueError):
            problems.append(f"SEG frame {number} lacks its source image or position")
            continue
        expected = positions.get((uid, frame_number)) or positions.get((uid, None))
        if expected is None:
            problems.append(f"SEG frame {number} derives from {uid}, which is not in the source series")
        elif np.max(np.abs(np.array(position) - np.array(expected))) > POSITION_TOLERANCE_MM:
            problems.append(f"SEG frame {number} lies at {position}, its source image at {list(expected)}")
    return problems


def object_problems(volume: Volume, objects: dict[str, Dataset]) -> list[str]:
    """What is wrong with objects a model wrote itself (a MONAI Deploy application's), by file name.

    Each must carry valid UIDs, belong to the source study, be a new instance in a series other
    than the source series, and reference only the source series' instances (or, but for a SEG,
    the model's other objects); a SEG's frames must lie at their source images' positions.
    """
    positions = _source_positions(volume)
    source_uids = {uid for uid, _ in positions}
    own_uids = {str(ds.get("SOPInstanceUID", "")) for ds in objects.values()}
    problems = []
    seen: set[str] = set()
    for name, ds in objects.items():
        found = []
        uids = {keyword: str(ds.get(keyword, "") or "") for keyword in
                ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")}
        bad = [keyword for keyword, uid in uids.items() if not is_valid_uid(uid)]
        if bad:
            problems.append(f"{name}: {', '.join(bad)} missing or not a valid UID")
            continue
        if uids["StudyInstanceUID"] != volume.study_uid:
            found.append(f"belongs to study {uids['StudyInstanceUID']}, "
                         f"not the source series' study {volume.study_uid}")
        if uids["SOPInstanceUID"] in source_uids:
            found.append("is an instance of the source series, not a new result")
        elif uids["SeriesInstanceUID"] == volume.series_uid:
            found.append("is in the source series; a result belongs in a series of its own")
        if uids["SOPInstanceUID"] in seen:
            found.append(f"repeats SOP Instance UID {uids['SOPInstanceUID']} of another object")
        seen.add(uids["SOPInstanceUID"])
        if uids["SOPClassUID"] in SEG_CLASSES:
            found += seg_problems(ds, positions)
        else:
            foreign = _referenced_instances(ds) - source_uids - own_uids
            if foreign:
                found.append(f"references {len(foreign)} instance(s) neither in the source series nor among the "
                             f"model's objects, e.g. {sorted(foreign)[0]}")
        problems += [f"{name}: {problem}" for problem in found]
    return problems


def iod_validator() -> str | None:
    """Where dicom3tools' ``dciodvfy`` is, which the gate runs on every object; None: not installed."""
    return shutil.which("dciodvfy")


def validator_in_use() -> str:
    """The gate's IOD check in words, for start-up: ``dciodvfy (PATH)`` or ``none (install dicom3tools)``."""
    tool = iod_validator()
    if tool is None:
        return "none (install dicom3tools): only references and frame positions are checked"
    return f"dciodvfy ({tool})"


def iod_problems(objects: dict[str, Dataset]) -> list[str]:
    """Errors dciodvfy reports on each object; nothing when dciodvfy is not installed."""
    tool = iod_validator()
    if tool is None:
        return []
    problems = []
    with tempfile.TemporaryDirectory(prefix="pacsworker-validate-") as folder:
        for role, ds in objects.items():
            path = Path(folder) / f"{role}.dcm"
            ds.save_as(path, enforce_file_format=True)
            if ds.get("SegmentationType") == "LABELMAP":
                continue  # the Label Map Segmentation IOD is newer than dicom3tools' tables
            result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
            errors = [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("Error")]
            problems += [f"{role}: {line}" for line in errors]
    return problems


def validate_results(volume: Volume, seg: Dataset | None, sr: Dataset | None, image_sr: Dataset | None = None) -> list[str]:
    """Every reason our SEG and SRs (those written) must not be delivered; empty when they may."""
    objects = {role: ds for role, ds in (("seg", seg), ("sr", sr), ("image_sr", image_sr)) if ds is not None}
    return referential_problems(volume, seg, sr, image_sr) + iod_problems(objects)


def validate_objects(volume: Volume, objects: dict[str, Dataset]) -> list[str]:
    """Every reason objects a model wrote itself (by file name) must not be delivered; empty when they may."""
    return object_problems(volume, objects) + iod_problems({Path(name).stem: ds for name, ds in objects.items()})
