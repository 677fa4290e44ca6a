"""Series tracker: which series are still receiving, which are complete, rebuilt from disk at start."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .. import metrics
from ..ledger import Ledger, SeriesFacts, ledger_at
from ..ledger.rows import FACT_KEYS
from ..logs import correlated
from ..records import DataLayout, SeriesRecord, SeriesState
from .integrity import Header
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
    facts: dict = field(default_factory=dict)  # routing facts (SeriesRecord fields), see routing_facts
    frames: int = 1  # Number of Frames
    images_in_acquisition: int | None = None  # Images in Acquisition, when the header gives a count
    position: tuple[float, float, float] | None = None  # Image Position (Patient) of a single-frame image
    cosines: tuple[float, ...] | None = None  # Image Orientation (Patient)
    temporal_position: int | None = None  # Temporal Position Identifier
    temporal_positions: int | None = None  # Number of Temporal Positions
    spacing: float | None = None  # Spacing Between Slices
    association: int | None = None  # which association brought it (None: STOW-RS, or read back at start)
    # the checked header, for routing facts read only when the instance opens a series
    header: Dataset | Header | None = field(default=None, repr=False, compare=False)

    def routing_facts(self) -> dict:
        """The routing facts: given, or read from ``header`` (once; only a series' first instance needs them)."""
        if not self.facts and self.header is not None:
            self.facts = series_facts(cast(Dataset, self.header))  # a Header reads as a Dataset does (get, attributes)
        return self.facts


def _number(header: Dataset | Header, keyword: str, n: int = 1) -> tuple[float, ...] | None:
    try:
        value = header.get(keyword)
        values = [float(v) for v in (value if n > 1 else [value])]
    except Exception:  # noqa: BLE001 - absent, empty or malformed: unknown
        return None
    return tuple(values) if len(values) == n and all(math.isfinite(v) for v in values) else None


def plane_facts(header: Dataset | Header) -> dict:
    """Where an instance lies and which temporal position it is, for completion and contiguity."""
    position, cosines = _number(header, "ImagePositionPatient", 3), _number(header, "ImageOrientationPatient", 6)
    temporal, temporals = _number(header, "TemporalPositionIdentifier"), _number(header, "NumberOfTemporalPositions")
    spacing = _number(header, "SpacingBetweenSlices")
    return {
        "position": position,
        "cosines": cosines,
        "temporal_position": int(temporal[0]) if temporal and temporal[0] >= 1 else None,
        "temporal_positions": int(temporals[0]) if temporals and temporals[0] >= 1 else None,
        "spacing": spacing[0] if spacing and spacing[0] > 0 else None,
    }


@dataclass
class _Pending:
    record: SeriesRecord
    sop_uids: set[str] = field(default_factory=set)
    frames: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> Number of Frames
    in_acquisition: set[int | None] = field(default_factory=set)  # Images in Acquisition values seen
    planes: dict[str, tuple] = field(default_factory=dict)  # SOP Instance UID -> (position, temporal position)
    cosines: set[tuple | None] = field(default_factory=set)
    temporal_positions: set[int | None] = field(default_factory=set)  # Number of Temporal Positions values seen
    spacing: set[float | None] = field(default_factory=set)  # Spacing Between Slices values seen
    released: str = ""  # a trusted sender released the association that brought the latest instances
    announced: float = 0.0  # last_seen of the content whose completion was logged (a retried routing says it once)

    def images(self) -> int:
        """Frames added up; an instance whose header was not readable counts as one."""
        return sum(self.frames.get(sop_uid, 1) for sop_uid in self.sop_uids)

    def add(self, meta: InstanceMeta) -> None:
        self.sop_uids.add(meta.sop_instance_uid)
        self.frames[meta.sop_instance_uid] = meta.frames
        self.in_acquisition.add(meta.images_in_acquisition)
        self.planes[meta.sop_instance_uid] = (meta.position, meta.temporal_position)
        self.cosines.add(meta.cosines)
        self.temporal_positions.add(meta.temporal_positions)
        self.spacing.add(meta.spacing)
        self.released = ""

    def evidence(self) -> str:
        """Why the data says the series is whole, or "" when only the quiet time can tell."""
        single_frame = max(self.frames.values(), default=1) == 1
        if len(self.sop_uids) == 1 and not single_frame:
            return "one multi-frame instance holds the volume"
        if len(self.in_acquisition) == 1:
            [expected] = self.in_acquisition
            if expected and expected == len(self.sop_uids) and single_frame:
                return f"all {expected} Images in Acquisition arrived"
        if len(self.temporal_positions) == 1 and single_frame:
            [count] = self.temporal_positions
            whole = self._temporal_whole(count) if count else ""
            if whole:
                return whole
        return self.released

    def _temporal_whole(self, count: int) -> str:
        """Every temporal position 1..count holds the same slice positions, each once."""
        by_time: dict[int, list] = {}
        for position, temporal in self.planes.values():
            if temporal is None or position is None:
                return ""
            by_time.setdefault(temporal, []).append(tuple(round(v, 2) for v in position))
        if set(by_time) != set(range(1, count + 1)):
            return ""
        layouts = {tuple(sorted(positions)) for positions in by_time.values()}
        if len(layouts) != 1:
            return ""
        [layout] = layouts
        if len(set(layout)) != len(layout):
            return ""
        return f"all {count} temporal positions of {len(layout)} slices arrived"

    def contiguity(self) -> tuple[bool | None, str]:
        """Whether the slice positions leave no gap wider than the series' own spacing, and what was found."""
        if max(self.frames.values(), default=1) > 1:
            return None, "not checked here: multi-frame (the loader checks each frame's position)"
        cosines = next(iter(self.cosines)) if len(self.cosines) == 1 else None
        if cosines is None:
            return None, "not checked: orientation missing or differing between instances"
        positions = [p for p, _ in self.planes.values()]
        if any(p is None for p in positions):
            return None, "not checked: an instance without Image Position (Patient)"
        normal = np.cross(cosines[:3], cosines[3:])
        distances = np.unique(np.round(np.asarray(positions) @ normal, 3))
        if len(distances) < 2:
            return None, f"{len(distances)} slice position(s)"
        gaps = np.diff(distances)
        stated = next(iter(self.spacing)) if len(self.spacing) == 1 else None
        spacing = stated or float(np.median(gaps))
        wide = np.flatnonzero(gaps > spacing * 1.1 + 0.01)
        if len(wide) == 0:
            return True, f"{len(distances)} slice positions, no gap wider than {spacing:.3g} mm"
        first = int(wide[0])
        return False, (
            f"{len(wide)} gap(s) wider than the spacing of {spacing:.3g} mm; the first is {gaps[first]:.3g} mm "
            f"after slice {first + 1} of {len(distances)}"
        )


class SeriesTracker:
    """Keeps every series with instances on disk until it has been routed.

    A series is complete once ``quiet_seconds`` pass without a new instance. The ledger and the
    spool are the truth: after a restart, every spooled series not yet routed (or receiving again)
    is pending.
    """

    def __init__(self, layout: DataLayout, quiet_seconds: float, evidence_seconds: float | None = 1.0,
                 ledger: Ledger | None = None):
        self.layout = layout
        self.ledger = ledger if ledger is not None else ledger_at(layout.root, "scp")
        self.quiet_seconds = quiet_seconds
        # with evidence that the series is whole, it completes after this shorter quiet time
        # (None: the quiet time alone decides)
        self.evidence_seconds = evidence_seconds
        self._pending: dict[str, _Pending] = {}
        self._by_association: dict[int, set[str]] = {}  # open associations -> the series they sent to
        self._lock = threading.Lock()

    def observe(self, meta: InstanceMeta) -> None:
        now = time.time()
        while True:
            with self._lock:
                entry = self._pending.get(meta.series_uid)
                if entry is not None:
                    self._add(entry, meta, now)
                    return
            # outside the lock: re-reading a routed series' headers must not hold up other senders
            fresh = self._open(meta, now)
            with self._lock:
                opened = meta.series_uid not in self._pending
                if opened:
                    self._pending[meta.series_uid] = fresh
                    self._add(fresh, meta, now)
            if opened:  # in the ledger: receiving (outside the lock: other senders go on meanwhile)
                self.ledger.record_instance(_facts(fresh.record))
                return
            # another instance of the series opened it meanwhile: add to that entry

    def _add(self, entry: _Pending, meta: InstanceMeta, now: float) -> None:
        entry.add(meta)
        entry.record.instances = len(entry.sop_uids)
        entry.record.last_seen = now
        if meta.association is not None:
            self._by_association.setdefault(meta.association, set()).add(meta.series_uid)

    def _open(self, meta: InstanceMeta, now: float) -> _Pending:
        """A pending entry for a series not pending: new, or received again after routing."""
        known = self.ledger.series(meta.series_uid)
        if known is None:
            entry = _Pending(SeriesRecord(
                series_uid=meta.series_uid,
                study_uid=meta.study_uid,
                modality=meta.modality,
                sop_class_uid=meta.sop_class_uid,
                calling_aet=meta.calling_aet,
                **meta.routing_facts(),
            ))
        else:
            entry = _Pending(_record_of(known))
            # received again after routing: process the series anew, with what it already holds
            for earlier in _metas_of(series_files(self.layout.series_dir(meta.series_uid))):
                entry.add(earlier)
        entry.record.state, entry.record.reason, entry.record.first_seen = SeriesState.RECEIVING, "", now
        return entry

    def association_ended(self, association: int, released_by: str | None) -> None:
        """An association closed; ``released_by`` names a sender trusted to release after whole series."""
        with self._lock:
            series = self._by_association.pop(association, set())
            if released_by is None:
                return
            for uid in series:
                entry = self._pending.get(uid)
                if entry is not None:
                    entry.released = f"{released_by} released the association that sent it"

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
            known = self.ledger.series(folder.name)
            if known is not None and known.state != SeriesState.RECEIVING.value and newest <= known.last_seen:
                continue
            metas = _metas_of(files)
            record = _record_of(known) if known is not None else None
            if record is None:
                record = _record_from_file(files[0])
                if record is None:
                    log.error("spooled series %s: no readable instance header; left as is", folder.name)
                    continue
            entry = _Pending(record, {p.stem for p in files})
            for meta in metas:  # what completion and the contiguity check know of each instance
                entry.add(meta)
            record.state = SeriesState.RECEIVING
            record.instances = len(entry.sop_uids)
            record.last_seen = time.time()
            self.ledger.record_instance(_facts(record), instances=record.instances)
            with self._lock:
                self._pending[folder.name] = entry
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
                elif evidence and self.evidence_seconds is not None and quiet >= self.evidence_seconds:
                    due.append((entry, evidence))
        for entry in list(self._pending.values()):
            if all(entry is not e for e, _ in due) and self._requested(entry.record.series_uid):
                due.append((entry, "completed on request"))
        done = 0
        for entry, why in due:
            snapshot = entry.record.model_copy()
            snapshot.completed_by = why
            with self._lock:
                snapshot.sop_instance_uids = sorted(entry.sop_uids)  # what its jobs are made for, fixed
                snapshot.instances = len(snapshot.sop_instance_uids)
                snapshot.content_digest = content_digest(entry.sop_uids)
                snapshot.frames = entry.images()  # once, here: routing counts images, not instances
                snapshot.contiguous, snapshot.contiguity = entry.contiguity()
            try:
                with correlated(snapshot.series_uid):
                    self._complete(snapshot)
                    if entry.announced != snapshot.last_seen:  # before the routing's lines (queued, skipped)
                        entry.announced = snapshot.last_seen
                        log.info("series %s complete (%d instances): %s", snapshot.series_uid, snapshot.instances, why)
                    on_complete(snapshot)
            except Exception as exc:  # noqa: BLE001 - keep serving, retry next tick
                log.error("series %s complete but not routed: %s; will retry", snapshot.series_uid, exc)
                continue
            with self._lock:
                current = self._pending.get(snapshot.series_uid)
                if current is entry and entry.record.last_seen == snapshot.last_seen:
                    del self._pending[snapshot.series_uid]
                    done += 1
            self.layout.completion_request(snapshot.series_uid).unlink(missing_ok=True)
            metrics.SERIES_COMPLETED.labels(metrics.completed_by_kind(why)).inc()
            metrics.observe_stage("receive", snapshot.last_seen - snapshot.first_seen)
            metrics.observe_stage("complete", time.time() - snapshot.last_seen)
        return done

    def _complete(self, snapshot: SeriesRecord) -> None:
        """The series is complete in the ledger (still receiving there until it is routed)."""
        def complete() -> bool:
            return self.ledger.complete_series(
                snapshot.series_uid, instances=snapshot.instances, frames=snapshot.frames,
                content_digest=snapshot.content_digest, completed_by=snapshot.completed_by,
                contiguous=snapshot.contiguous, contiguity=snapshot.contiguity)

        if not complete():
            # not receiving there (its opening was not recorded, or it was routed meanwhile): open it again
            self.ledger.record_instance(_facts(snapshot), instances=snapshot.instances)
            complete()

    def _requested(self, series_uid: str) -> bool:
        try:
            return self.layout.completion_request(series_uid).exists()
        except ValueError:
            return False


def content_digest(sop_uids: set[str]) -> str:
    """Names a series' content: the same instance set gives the same digest, so the same job."""
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()[:16]


def _metas_of(files) -> list[InstanceMeta]:
    """What the receiver knew of spooled instances, read back from their headers (unreadable ones skipped)."""
    from .server import read_instance_meta

    metas = []
    for path in files:
        try:
            meta = read_instance_meta(pydicom.dcmread(path, stop_before_pixels=True), "")
            meta.header = None  # a spooled series has its record (and routing facts) already
            metas.append(meta)
        except Exception:  # noqa: BLE001 - it was checked when it arrived; the loader reports it if it is bad
            log.warning("spooled instance %s: header not readable; counted without its geometry", path.name)
    return metas


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


def _facts(record: SeriesRecord) -> SeriesFacts:
    """What the ledger keeps of a series: identifiers and routing facts."""
    return SeriesFacts(record.series_uid, record.study_uid, modality=record.modality[:16],
                       sop_class_uid=record.sop_class_uid, calling_aet=record.calling_aet[:16],
                       facts={key: getattr(record, key) for key in FACT_KEYS})


def _record_of(known) -> SeriesRecord:
    """The receiver's working copy of a series the ledger knows."""
    return SeriesRecord(series_uid=known.series_uid, study_uid=known.study_uid, modality=known.modality,
                        sop_class_uid=known.sop_class_uid, calling_aet=known.calling_aet,
                        **{key: value for key, value in (known.facts or {}).items() if key in FACT_KEYS})
