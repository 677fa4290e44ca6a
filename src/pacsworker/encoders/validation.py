"""The gate before delivery: result objects must reference what exists and sit where their sources are.

highdicom checks each object's attributes while building it; this checks what it cannot know:
every instance a SEG or SR references is in the source series (or is the job's own SEG), every
SEG frame lies at the position of the source image it was derived from, and, where dicom3tools'
``dciodvfy`` is installed, that this IOD validator reports no error.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ..worker.volume import Volume

POSITION_TOLERANCE_MM = 1e-3


def _referenced_instances(ds: Dataset) -> set[str]:
    """SOP Instance UIDs in the object's series-level reference sequences."""
    found = set()
    for keyword in ("ReferencedSeriesSequence", "CurrentRequestedProcedureEvidenceSequence"):
        for item in ds.get(keyword, []):
            series = item.get("ReferencedSeriesSequence", [item]) if keyword != "ReferencedSeriesSequence" else [item]
            for series_item in series:
                for instance in series_item.get("ReferencedInstanceSequence", []) or series_item.get("ReferencedSOPSequence", []):
                    found.add(str(instance.ReferencedSOPInstanceUID))
    return found


def referential_problems(volume: Volume, seg: Dataset | None, sr: Dataset) -> list[str]:
    """What the SEG and SR reference that the source series does not hold, or holds elsewhere."""
    positions: dict[tuple[str, int | None], tuple[float, float, float]] = {
        (str(s.dataset.SOPInstanceUID), s.frame_number): s.position for s in volume.sources
    }
    source_uids = {uid for uid, _ in positions}
    if seg is None:
        foreign = _referenced_instances(sr) - source_uids
        return [f"SR references {len(foreign)} instance(s) not in the source series"] if foreign else []
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
    foreign = _referenced_instances(sr) - source_uids - {str(seg.SOPInstanceUID)}
    if foreign:
        problems.append(f"SR references {len(foreign)} instance(s) that are neither the SEG nor in the source series")
    if str(seg.SOPInstanceUID) not in _referenced_instances(sr):
        problems.append("SR does not list the SEG among its evidence")
    return problems


def iod_problems(objects: dict[str, Dataset]) -> list[str]:
    """Errors dciodvfy reports on each object; nothing when dciodvfy is not installed."""
    tool = shutil.which("dciodvfy")
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


def validate_results(volume: Volume, seg: Dataset | None, sr: Dataset) -> list[str]:
    """Every reason the SEG (if any) and SR must not be delivered; empty when they may."""
    objects = {"seg": seg, "sr": sr} if seg is not None else {"sr": sr}
    return referential_problems(volume, seg, sr) + iod_problems(objects)
