"""Folder destination: ``<path>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, written atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom

from ..config import FolderDestination
from ..records import is_valid_uid
from .outcome import DeliveryError, InstanceResult, Verdict


def send_folder(destination: FolderDestination, files: list[Path]) -> list[InstanceResult]:
    """Copy each file into place (fsync, then rename); a folder that cannot be written is permanent."""
    results = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        uids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
        if not all(is_valid_uid(uid) for uid in uids):
            results.append(InstanceResult(path, Verdict.PERMANENT, "a UID is not valid as part of a path"))
            continue
        folder = Path(destination.path) / uids[0] / uids[1]
        final = folder / f"{uids[2]}.dcm"
        tmp = folder / f".tmp-{uids[2]}.{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except PermissionError as exc:
            raise DeliveryError(f"folder {destination.path}: {exc.strerror} ({exc.filename})", permanent=True) from None
        except OSError as exc:  # a full disk or a missing mount may heal
            tmp.unlink(missing_ok=True)
            raise DeliveryError(f"folder {destination.path}: {exc.strerror or exc}") from None
        results.append(InstanceResult(path, Verdict.STORED, "stored"))
    return results
