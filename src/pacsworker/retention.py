"""Retention of ``data_dir``: what ``pacsworker cleanup`` may remove, and removing it safely.

Removable are the spool folders of series that are finished (every job of theirs ended and every
result delivered) and the outbox folders of delivered jobs, once their last activity is older
than the retention time. Never removed: a series that is receiving, queued or running, one with a
result still in the outbox (undelivered, or given up on), one a study model still waits for, and
the small JSON records (so ``status`` keeps the history and a resent series finds its finished
job instead of running again). Quarantined results are left for the operator.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .records import (
    DataLayout,
    DeliveryRecord,
    JobRecord,
    JobState,
    SeriesRecord,
    SeriesState,
    StudyRecord,
    is_valid_uid,
    read_json,
    series_lock,
)

log = logging.getLogger("pacsworker.cleanup")

FINISHED_SERIES = {SeriesState.DONE, SeriesState.NO_RESULT, SeriesState.SKIPPED}
FAILED_SERIES = {SeriesState.FAILED, SeriesState.IMPLAUSIBLE}
FINISHED_JOBS = {JobState.DONE, JobState.NO_RESULT}
FAILED_JOBS = {JobState.FAILED, JobState.IMPLAUSIBLE}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """Seconds in an age such as ``7d``, ``24h``, ``90m``, ``3600s`` or ``2w`` (a bare number: days).

    Raises
    ------
    ValueError
        If the text is not a positive number with one of the units s, m, h, d, w.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not an age such as 7d, 24h, 90m or 3600s")
    return float(match.group(1)) * UNITS[match.group(2) or "d"]


@dataclass
class Removal:
    """One folder that cleanup removes: a series' spool folder or a job's outbox folder."""

    kind: str  # "series" or "outbox"
    uid: str  # Series Instance UID, or job id
    path: Path
    bytes: int
    age_seconds: float


@dataclass
class RetentionPlan:
    """What is old enough and finished (``removals``), and why the rest of the old folders stay."""

    removals: list[Removal]
    kept: dict[str, int]  # reason -> number of old spool or outbox folders kept for it


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _newest_mtime(path: Path) -> float:
    newest = 0.0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _job_activity(job: JobRecord) -> float:
    return max(job.finished_at, job.timings.get("delivered_at", 0.0), job.queued_at)


class _Facts:
    """Records read once per run: jobs by series, deliveries by job."""

    def __init__(self, layout: DataLayout):
        self.layout = layout
        self.jobs_of: dict[str, list[JobRecord]] = {}
        self.jobs: dict[str, JobRecord] = {}
        for job in layout.iter_records(layout.jobs, JobRecord):
            self.jobs[job.job_id] = job
            for uid in {job.series_uid, *job.series_uids}:
                self.jobs_of.setdefault(uid, []).append(job)
        self.deliveries = {d.job_id: d for d in layout.iter_deliveries()}

    def refresh_series(self, series_uid: str) -> None:
        """Read the records of a series' jobs and their deliveries again (just before removing it)."""
        fresh = []
        for job in self.jobs_of.get(series_uid, []):
            job = read_json(self.layout.job_record(job.job_id), JobRecord) or job
            self.jobs[job.job_id] = job
            fresh.append(job)
            delivery = read_json(self.layout.delivery_record(job.job_id), DeliveryRecord)
            if delivery is not None:
                self.deliveries[job.job_id] = delivery
        self.jobs_of[series_uid] = fresh

    def series_hold(self, record: SeriesRecord | None, include_failed: bool) -> str:
        """Why a series' spool folder must stay ('' when it may go)."""
        if record is None:
            return "no series record (the receiver has not recorded it yet)"
        allowed = FINISHED_SERIES | (FAILED_SERIES if include_failed else set())
        if record.state not in allowed:
            return f"series {record.state.value}"
        ended = FINISHED_JOBS | (FAILED_JOBS if include_failed else set())
        for job_id in [*record.jobs, *record.earlier_jobs]:
            if job_id not in self.jobs:
                return "a job record is missing"
        for job in self.jobs_of.get(record.series_uid, []):
            delivery = self.deliveries.get(job.job_id)
            if delivery is not None and not delivery.complete:
                return "results not delivered"
            if job.state not in ended:
                return f"a job {job.state.value}"
        if getattr(record, "study_models", None):
            study = read_json(self.layout.studies / f"{record.study_uid}.json", StudyRecord)
            if study is None or study.waiting:
                return "a study model waits for its study"
        return ""

    def series_activity(self, record: SeriesRecord, folder: Path) -> float:
        jobs = self.jobs_of.get(record.series_uid, [])
        return max([record.last_seen, _newest_mtime(folder), *(_job_activity(j) for j in jobs)])

    def outbox_hold(self, job_id: str) -> str:
        delivery = self.deliveries.get(job_id)
        if delivery is None:
            return "no delivery record"
        if not delivery.complete:
            return "results not delivered"
        job = self.jobs.get(job_id)
        if job is None or job.state != JobState.DONE:
            return "job not done"
        return ""

    def outbox_activity(self, job_id: str) -> float:
        delivery: DeliveryRecord = self.deliveries[job_id]
        delivered = [d.delivered_at for d in delivery.destinations.values()]
        return max([_job_activity(self.jobs[job_id]), *delivered])


class Retention:
    """Plans and performs the removal of finished, delivered folders older than a retention time."""

    def __init__(self, layout: DataLayout, include_failed: bool = False):
        self.layout = layout
        self.include_failed = include_failed
        self.facts = _Facts(layout)

    def plan(self, older_than: float, now: float | None = None) -> RetentionPlan:
        """The spool and outbox folders that may go: finished, delivered and idle for ``older_than`` s."""
        now = time.time() if now is None else now
        layout, facts = self.layout, self.facts
        removals: list[Removal] = []
        kept: dict[str, int] = {}
        for folder in sorted(p for p in layout.spool.glob("*") if p.is_dir() and is_valid_uid(p.name)):
            record = read_json(layout.series_record(folder.name), SeriesRecord)
            age = now - (facts.series_activity(record, folder) if record else _newest_mtime(folder))
            if age < older_than:
                continue
            hold = facts.series_hold(record, self.include_failed)
            if hold:
                kept[hold] = kept.get(hold, 0) + 1
            else:
                removals.append(Removal("series", folder.name, folder, folder_bytes(folder), age))
        for folder in sorted(p for p in layout.outbox.glob("*") if p.is_dir()):
            hold = facts.outbox_hold(folder.name)
            if hold:
                if now - _newest_mtime(folder) >= older_than:
                    kept[hold] = kept.get(hold, 0) + 1
                continue
            age = now - facts.outbox_activity(folder.name)
            if age >= older_than:
                removals.append(Removal("outbox", folder.name, folder, folder_bytes(folder), age))
        return RetentionPlan(removals, kept)

    def remove(self, removal: Removal) -> bool:
        """Remove one planned folder; returns False when it had to stay after all.

        A series' folder is renamed aside under its series lock, after its records were read
        again; an instance the receiver stored into it meanwhile (newer than the series' last
        instance) is moved back, and the series stays.
        """
        if removal.kind == "outbox":
            shutil.rmtree(removal.path, ignore_errors=True)
            return True
        aside = self.layout.root / ".cleanup" / removal.uid
        with series_lock(self.layout, removal.uid):
            record = read_json(self.layout.series_record(removal.uid), SeriesRecord)
            self.facts.refresh_series(removal.uid)
            if record is None or self.facts.series_hold(record, self.include_failed):
                return False
            aside.parent.mkdir(exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)  # a leftover of an interrupted run
            os.rename(removal.path, aside)
        return _discard_aside(self.layout, aside, record)


def _discard_aside(layout: DataLayout, aside: Path, record: SeriesRecord) -> bool:
    """Delete a series folder moved aside, unless instances arrived after the series was routed."""
    late = [p for p in aside.iterdir() if p.stat().st_mtime > record.last_seen + 1.0]
    if late:
        folder = layout.series_dir(aside.name)
        folder.mkdir(parents=True, exist_ok=True)
        for path in aside.iterdir():
            os.replace(path, folder / path.name)
        log.warning("series %s received %d instance(s) during cleanup; kept", aside.name, len(late))
    shutil.rmtree(aside, ignore_errors=True)
    return not late


def recover_aside(layout: DataLayout) -> None:
    """Finish what an interrupted cleanup left under ``.cleanup/`` (restoring late instances)."""
    root = layout.root / ".cleanup"
    if not root.is_dir():
        return
    for aside in sorted(p for p in root.iterdir() if p.is_dir()):
        record = read_json(layout.series_record(aside.name), SeriesRecord) if is_valid_uid(aside.name) else None
        if record is None:
            shutil.rmtree(aside, ignore_errors=True)
            continue
        with series_lock(layout, aside.name):
            _discard_aside(layout, aside, record)


def human_size(count: int) -> str:
    """``12.3 MiB``: a byte count for people."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
