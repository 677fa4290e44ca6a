"""Series tracker: which series are still receiving, which are complete, rebuilt from disk at start."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pydicom

from ..records import DataLayout, SeriesRecord, SeriesState, read_json, save_series
from .routing import series_facts
from .spool import series_files

log = logging.getLogger(__name__)


@dataclass
class InstanceMeta:
    """What the receiver learns of an instance without decoding its pixels."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    calling_aet: str
    facts: dict = field(default_factory=dict)  # routing facts (SeriesRecord fields) from its header
    frames: int = 1  # Number of Frames
    images_in_acquisition: int | None = None  # Images in Acquisition, when the header gives a count


@dataclass
class _Pending:
    record: SeriesRecord
    sop_uids: set[str] = field(default_factory=set)
    frames: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> Number of Frames
    in_acquisition: set[int | None] = field(default_factory=set)  # Images in Acquisition values seen

    def evidence(self) -> str:
        """Why the data says the series is whole, or "" when only the quiet time can tell."""
        if len(self.sop_uids) == 1 and max(self.frames.values(), default=1) > 1:
            return "one multi-frame instance holds the volume"
        if len(self.in_acquisition) == 1:
            [expected] = self.in_acquisition
            if expected and expected == len(self.sop_uids) and max(self.frames.values(), default=1) == 1:
                return f"all {expected} Images in Acquisition arrived"
        return ""


class SeriesTracker:
    """Keeps every series with instances on disk until it has been routed.

    A series is complete once ``quiet_seconds`` pass without a new instance. The record on disk is
    the truth: after a restart, every spooled series not yet routed (or receiving again) is pending.
    """

    def __init__(self, layout: DataLayout, quiet_seconds: float, evidence_seconds: float | None = 1.0):
        self.layout = layout
        self.quiet_seconds = quiet_seconds
        # with evidence that the series is whole, it completes after this shorter quiet time
        # (None: the quiet time alone decides)
        self.evidence_seconds = evidence_seconds
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def observe(self, meta: InstanceMeta) -> None:
        now = time.time()
        with self._lock:
            entry = self._pending.get(meta.series_uid)
            if entry is None:
                record = read_json(self.layout.series_record(meta.series_uid), SeriesRecord)
                if record is None:
                    record = SeriesRecord(
                        series_uid=meta.series_uid,
                        study_uid=meta.study_uid,
                        modality=meta.modality,
                        sop_class_uid=meta.sop_class_uid,
                        calling_aet=meta.calling_aet,
                        **meta.facts,
                    )
                    existing = set()
                else:
                    # received again after routing: process the series anew
                    existing = {p.stem for p in series_files(self.layout.series_dir(meta.series_uid))}
                record.state, record.reason, record.first_seen = SeriesState.RECEIVING, "", now
                entry = self._pending[meta.series_uid] = _Pending(record, existing)
                save_series(self.layout, record)
            entry.sop_uids.add(meta.sop_instance_uid)
            entry.frames[meta.sop_instance_uid] = meta.frames
            entry.in_acquisition.add(meta.images_in_acquisition)
            entry.record.instances = len(entry.sop_uids)
            entry.record.last_seen = now

    def rebuild(self) -> int:
        """Re-read the spool after a restart; returns how many series are pending.

        A pending series' quiet time starts again from now: its sender may have been cut off by
        the restart (or by a full disk) and resend the rest.
        """
        for folder in sorted(p for p in self.layout.spool.iterdir() if p.is_dir()):
            files = series_files(folder)
            if not files:
                continue
            newest = max(p.stat().st_mtime for p in files)
            record = read_json(self.layout.series_record(folder.name), SeriesRecord)
            if record is not None and record.state != SeriesState.RECEIVING and newest <= record.last_seen:
                continue
            if record is None:
                record = _record_from_file(files[0])
                if record is None:
                    log.error("spooled series %s: no readable instance header; left as is", folder.name)
                    continue
            record.state = SeriesState.RECEIVING
            record.instances = len(files)
            record.last_seen = time.time()
            with self._lock:
                self._pending[folder.name] = _Pending(record, {p.stem for p in files})
        return len(self._pending)

    def pending(self) -> list[SeriesRecord]:
        with self._lock:
            return [e.record.model_copy() for e in self._pending.values()]

    def complete_due(self, on_complete: Callable[[SeriesRecord], None], now: float | None = None) -> int:
        """Hand every quiet series to ``on_complete`` (which routes and records it).

        A series stays pending when ``on_complete`` raises (the queue is down, say) and is tried
        again on the next call.
        """
        now = time.time() if now is None else now
        due = []
        with self._lock:
            for entry in self._pending.values():
                quiet = now - entry.record.last_seen
                evidence = entry.evidence() if self.evidence_seconds is not None else ""
                if quiet >= self.quiet_seconds:
                    due.append((entry, f"quiet for {self.quiet_seconds:g} s"))
                elif evidence and quiet >= self.evidence_seconds:
                    due.append((entry, evidence))
        for entry in list(self._pending.values()):
            if all(entry is not e for e, _ in due) and self._requested(entry.record.series_uid):
                due.append((entry, "completed on request"))
        done = 0
        for entry, why in due:
            snapshot = entry.record.model_copy()
            snapshot.completed_by = why
            with self._lock:
                snapshot.content_digest = content_digest(entry.sop_uids)
            try:
                on_complete(snapshot)
            except Exception as exc:  # noqa: BLE001 - keep serving, retry next tick
                log.error("series %s complete but not routed: %s; will retry", snapshot.series_uid, exc)
                continue
            with self._lock:
                current = self._pending.get(snapshot.series_uid)
                if current is entry and entry.record.last_seen == snapshot.last_seen:
                    del self._pending[snapshot.series_uid]
                    done += 1
            save_series(self.layout, snapshot)
            self.layout.completion_request(snapshot.series_uid).unlink(missing_ok=True)
            log.info("series %s complete (%d instances): %s", snapshot.series_uid, snapshot.instances, why)
        return done

    def _requested(self, series_uid: str) -> bool:
        try:
            return self.layout.completion_request(series_uid).exists()
        except ValueError:
            return False


def content_digest(sop_uids: set[str]) -> str:
    """Names a series' content: the same instance set gives the same digest, so the same job."""
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()[:16]


def _record_from_file(path) -> SeriesRecord | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001
        return None
    return SeriesRecord(
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        modality=str(ds.get("Modality", "")),
        sop_class_uid=str(ds.SOPClassUID),
        calling_aet="",
        **series_facts(ds),
    )
