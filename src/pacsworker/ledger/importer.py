"""The upgrade from JSON records: on the first open of a ledger over a ``data_dir`` written by a release
that kept its state in JSON files (``series/*.json``, ``jobs/*.json``, ``studies/*.json``,
``outbox/*/delivery.json``), import them, then move them aside to ``data_dir/.pre-ledger/<timestamp>/``.

Crash-safe and idempotent: every row is inserted in one transaction together with an ``imported``
event (the marker), each insert skipping a row that is already there; the counters are rebuilt
(:meth:`recount`) after it, and the JSON files are moved aside last. A run that stopped anywhere
is finished by the next open: before the marker nothing was written, after it only the recount and
the moves are done again. On PostgreSQL an advisory lock keeps hosts starting together from
importing twice.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Table, select, text

from ..records import (
    DataLayout,
    DeliveryRecord,
    JobRecord,
    JobState,
    SeriesRecord,
    StudyRecord,
    is_valid_uid,
    read_json,
)
from .core import Tx, dialect_insert
from .database import db_now
from .rows import FACT_KEYS
from .schema import deliveries, delivery_instances, events, job_inputs, job_series, jobs, series, studies

log = logging.getLogger("pacsworker.ledger")

IMPORTED = "imported"  # the kind of the marker event: the JSON records are in the ledger
IMPORT_LOCK = 0x7061_6374  # a PostgreSQL advisory lock: one host imports, the others wait and find the marker
ASIDE = ".pre-ledger"
FOLDERS = ("series", "jobs", "studies", "receivers")
BATCH = 2000
UNFINISHED = {JobState.QUEUED, JobState.RUNNING}


@dataclass
class Imported:
    """How many records of each kind went into the ledger (and how many files could not be read)."""

    series: int = 0
    jobs: int = 0
    studies: int = 0
    deliveries: int = 0
    unreadable: list[str] = field(default_factory=list)
    aside: Path | None = None

    def line(self) -> str:
        unreadable = f", {len(self.unreadable)} unreadable file(s) moved aside unread" if self.unreadable else ""
        return (f"{self.series} series, {self.jobs} jobs, {self.studies} studies and {self.deliveries} deliveries"
                f"{unreadable}")


def json_sources(layout: DataLayout) -> list[Path]:
    """The JSON records of an earlier release under ``data_dir`` (folders holding any, delivery records)."""
    found = [folder for name in FOLDERS if (folder := layout.root / name).is_dir() and any(folder.glob("*.json"))]
    return found + sorted(layout.outbox.glob("*/delivery.json")) if layout.outbox.is_dir() else found


def import_json_records(ledger, data_dir: Path | str) -> Imported | None:
    """Import ``data_dir``'s JSON records into ``ledger`` once, then move them aside; None when there
    are none (the usual case: a ledger that has been opened before, or a new ``data_dir``)."""
    layout = DataLayout(Path(data_dir))
    sources = json_sources(layout)
    if not sources:
        return None
    counts = Imported()
    with ledger._write() as tx:
        if tx.conn.dialect.name == "postgresql":
            tx.conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": IMPORT_LOCK})
        marker = tx.conn.execute(select(events.c.reason).where(events.c.kind == IMPORTED)
                                 .order_by(events.c.id.desc()).limit(1)).scalar()
        if marker is None:
            _import(tx, layout, counts)
            tx.conn.execute(events.insert().values(
                at=db_now(), kind=IMPORTED, actor=tx.actor, count=counts.series,
                reason=f"JSON records of {layout.root} imported: {counts.line()}"))
    ledger.recount()
    counts.aside = _move_aside(layout, json_sources(layout), set(counts.unreadable))
    if marker is None:
        log.info("the ledger took over %s's JSON records: %s; the JSON files are kept in %s",
                 layout.root, counts.line(), counts.aside)
    else:
        log.info("JSON records of %s were imported before (%s); moved what was left aside to %s",
                 layout.root, marker, counts.aside)
    return counts


def _records(folder: Path, kind: type[BaseModel], counts: Imported):
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = read_json(path, kind)
        except ValueError:
            counts.unreadable.append(str(path))
            continue
        if record is not None:
            yield record


def _insert(tx: Tx, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows, skipping any already there (a second import finds them)."""
    for start in range(0, len(rows), BATCH):
        tx.conn.execute(dialect_insert(tx.conn, table).on_conflict_do_nothing(), rows[start:start + BATCH])


def _import(tx: Tx, layout: DataLayout, counts: Imported) -> None:
    series_rows, links = [], {}
    for record in _records(layout.series, SeriesRecord, counts):
        if not (is_valid_uid(record.series_uid) and is_valid_uid(record.study_uid)):
            continue
        facts = {key: getattr(record, key) for key in FACT_KEYS if getattr(record, key)}
        series_rows.append({
            "series_uid": record.series_uid, "study_uid": record.study_uid, "state": record.state.value,
            "modality": record.modality[:16], "sop_class_uid": record.sop_class_uid, "calling_aet": record.calling_aet[:16],
            "facts": facts, "instances": record.instances, "frames": record.frames, "first_seen": record.first_seen,
            "last_seen": record.last_seen, "completed_by": record.completed_by, "content_digest": record.content_digest,
            "contiguous": record.contiguous, "contiguity": record.contiguity, "study_models": record.study_models,
            "reason": record.reason})
        for job_id in record.earlier_jobs:
            links[(job_id, record.series_uid)] = False
        for job_id in record.jobs:
            links[(job_id, record.series_uid)] = True
    job_rows, input_rows, known = [], [], set()
    for job in _records(layout.jobs, JobRecord, counts):
        known.add(job.job_id)
        members = job.series_uids or [job.series_uid]
        for uid in members:
            links.setdefault((job.job_id, uid), True)
        job_rows.append({
            "job_id": job.job_id, "series_uid": job.series_uid, "study_uid": job.study_uid, "model": job.model,
            "scope": "study" if job.series_uids else "series", "spool_dir": job.spool_dir, "state": job.state.value,
            "attempts": job.attempts, "worker": job.worker, "stage": job.stage, "queued_at": job.queued_at,
            "sent_at": job.sent_at, "heartbeat": job.heartbeat, "started_at": job.started_at,
            "finished_at": job.finished_at, "outputs": job.outputs, "values": job.values, "timings": job.timings,
            "implausible": job.implausible, "notes": job.notes, "reason": job.reason, "traceback": job.traceback})
        if job.state in UNFINISHED:  # its worker loads exactly its inputs: what the spool holds now
            for uid in members:
                input_rows += [{"job_id": job.job_id, "series_uid": uid, "sop_instance_uid": name[:-4]}
                               for name in _spooled(layout, uid)]
    study_rows = [{"study_uid": s.study_uid, "members": s.series, "models": s.models, "last_seen": s.last_seen,
                   "waiting": s.waiting}
                  for s in _records(layout.studies, StudyRecord, counts) if is_valid_uid(s.study_uid)]
    delivery_rows, instance_rows = [], []
    taken: list[tuple[str, str, float]] = []
    for path in sorted(layout.outbox.glob("*/delivery.json")) if layout.outbox.is_dir() else []:
        try:
            delivery = read_json(path, DeliveryRecord)
        except ValueError:
            counts.unreadable.append(str(path))
            continue
        if delivery is None or delivery.job_id not in known:
            continue
        taken.append((delivery.job_id, delivery.task_id, delivery.started_at))
        for name, outcome in delivery.destinations.items():
            counts.deliveries += 1
            delivery_rows.append({
                "job_id": delivery.job_id, "destination": name, "state": outcome.state.value,
                "attempts": outcome.attempts, "last_error": outcome.last_error, "permanent": outcome.permanent,
                "next_attempt_at": outcome.next_attempt_at, "delivered_at": outcome.delivered_at,
                "dead_lettered_at": outcome.dead_lettered_at})
            for file in delivery.files:
                instance = outcome.instances.get(file)
                instance_rows.append({
                    "job_id": delivery.job_id, "destination": name, "file_name": file,
                    "sop_instance_uid": delivery.sop_instance_uids.get(file, ""),
                    "state": instance.state.value if instance else outcome.state.value,
                    "detail": instance.detail if instance else "",
                    "delivered_at": instance.delivered_at if instance else outcome.delivered_at})
    counts.series, counts.jobs, counts.studies = len(series_rows), len(job_rows), len(study_rows)
    _insert(tx, series, series_rows)
    _insert(tx, jobs, job_rows)
    _insert(tx, job_series, [{"job_id": job_id, "series_uid": uid, "current": current}
                             for (job_id, uid), current in sorted(links.items()) if job_id in known])
    _insert(tx, job_inputs, input_rows)
    _insert(tx, studies, study_rows)
    _insert(tx, deliveries, delivery_rows)
    _insert(tx, delivery_instances, instance_rows)
    for job_id, task_id, started in taken:
        tx.conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
            delivery_task=task_id[:64], delivery_started_at=started))


def _spooled(layout: DataLayout, series_uid: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(layout.series_dir(series_uid))
                      if name.endswith(".dcm") and is_valid_uid(name[:-4]))
    except (OSError, ValueError):
        return []


def _move_aside(layout: DataLayout, sources: list[Path], unreadable: set[str]) -> Path:
    """Move the imported JSON folders (and each outbox's delivery.json) under ``.pre-ledger/<timestamp>/``;
    each move is one rename, a source another process moved already is passed over."""
    aside = layout.root / ASIDE / time.strftime("%Y%m%d-%H%M%S")
    for source in sources:
        target = aside / source.relative_to(layout.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            continue
        if source.name in FOLDERS:
            source.mkdir(exist_ok=True)  # the roles of this release may still write markers there
    if unreadable:
        log.warning("%d JSON record(s) could not be read and were moved aside with the rest: %s", len(unreadable),
                    ", ".join(sorted(unreadable)[:5]))
    return aside
