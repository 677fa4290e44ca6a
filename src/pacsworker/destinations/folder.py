"""Folder destination: ``<path>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, written atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom

from ..config import FolderDestination


def send_folder(destination: FolderDestination, files: list[Path]) -> None:
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        folder = Path(destination.path) / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{ds.SOPInstanceUID}.dcm"
        tmp = folder / f".tmp-{ds.SOPInstanceUID}.{os.getpid()}"
        shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
