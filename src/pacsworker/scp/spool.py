"""Durable spool: an instance is on disk (fsync + rename) before the receiver answers Success."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..records import DataLayout, is_valid_uid

log = logging.getLogger("pacsworker.scp")
KNOWN_FOLDERS = 4096

class Spool:
    """Writes received instances to ``spool/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``."""

    def __init__(self, layout: DataLayout):
        self.layout = layout
        # series folders known to exist: no stat and mkdir per instance
        self._folders: dict[Path, None] = {}

    def remove_orphans(self) -> int:
        """Delete temporaries of writes a crash interrupted (never acknowledged); returns the count."""
        count = 0
        for tmp in [*self.layout.spool.glob("*/.tmp-*"), *self.layout.incoming.glob("in-*")]:
            tmp.unlink(missing_ok=True)
            count += 1
        if count:
            log.info("removed %d unfinished spool file(s) left by an interrupted receiver", count)
        return count

    def adopt(self, series_uid: str, sop_instance_uid: str, incoming) -> Path:
        """Make a dataset received into ``incoming/`` durable and move it into the spool; returns its path.

        Raises
        ------
        OSError
            If the disk refused the write (full, read-only); the incoming file is left to its owner.
        """

        def durable(folder: Path) -> str:
            incoming.sync()
            return incoming.name

        placed = self._place(series_uid, sop_instance_uid, durable)
        incoming.name = ""  # moved: nothing is left under the incoming name to delete
        return placed

    def store(self, series_uid: str, sop_instance_uid: str, parts: Sequence[bytes | memoryview]) -> Path:
        """Store the parts (preamble, file meta, dataset as received) as one file; returns its path.

        Raises
        ------
        ValueError
            If either UID is not a valid DICOM UID (it would otherwise become part of a path).
        OSError
            If the disk refused the write (full, read-only); nothing partial is left behind.
        """

        def durable(folder: Path) -> Path:
            tmp = folder / f".tmp-{sop_instance_uid}.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
            return tmp

        return self._place(series_uid, sop_instance_uid, durable)

    def _place(self, series_uid: str, sop_instance_uid: str, durable: Callable[[Path], Path | str]) -> Path:
        """Rename the file ``durable(folder)`` wrote and fsynced to its spool path, then fsync the folders."""
        if not is_valid_uid(sop_instance_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_instance_uid!r}")
        folder = self.layout.series_dir(series_uid)
        final = folder / f"{sop_instance_uid}.dcm"
        if folder not in self._folders:
            self._make_folder(folder)
        try:
            os.replace(durable(folder), final)
        except FileNotFoundError:  # the series folder was removed meanwhile (cleanup): make it again
            self._folders.pop(folder, None)
            self._make_folder(folder)
            os.replace(durable(folder), final)
        _fsync_dir(folder)
        return final

    def _make_folder(self, folder: Path) -> None:
        """Create a series folder (its entry made durable) unless it exists; remember it as existing."""
        new_folder = not folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if new_folder:
            _fsync_dir(self.layout.spool)
        if len(self._folders) >= KNOWN_FOLDERS:
            self._folders.clear()
        self._folders[folder] = None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def series_files(folder: Path) -> list[Path]:
    """The complete instances of a spooled series (temporaries excluded)."""
    return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("."))
