"""Retention of ``data_dir``: what ``pacsworker cleanup`` may remove, and removing it safely.

Removable are the spool folders of series that are finished (every job of theirs ended and every
result delivered) and the outbox folders of delivered jobs, once their last activity is older
than the retention time. Never removed: a series that is receiving, queued or running, one with a
result still in the outbox (undelivered, or given up on), one a study model still waits for, and
the ledger's rows (so ``status`` keeps the states and a resent series finds its finished job
instead of running again; only history events older than ``storage.history_days`` are trimmed).
Quarantined results are left for the operator.

Each spool or outbox folder is judged by the ledger's rows of its series or job (by key): a run
costs O(folders on disk), never a read of the whole history.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .ledger import Job, Ledger, Series
from .records import DataLayout, JobState, SeriesState, is_valid_uid

log = logging.getLogger("pacsworker.cleanup")

FINISHED_SERIES = {s.value for s in (SeriesState.DONE, SeriesState.NO_RESULT, SeriesState.SKIPPED)}
FAILED_SERIES = {s.value for s in (SeriesState.FAILED, SeriesState.IMPLAUSIBLE)}
FINISHED_JOBS = {s.value for s in (JobState.DONE, JobState.NO_RESULT)}
FAILED_JOBS = {s.value for s in (JobState.FAILED, JobState.IMPLAUSIBLE)}
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


def _job_activity(job: Job) -> float:
    return max(job.finished_at, job.timings.get("delivered_at", 0.0), job.queued_at)


class _Facts:
    """What the ledger says of one series or job, read by key."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def series_hold(self, record: Series | None, include_failed: bool) -> str:
        """Why a series' spool folder must stay ('' when it may go)."""
        if record is None:
            return "no series in the ledger (the receiver has not recorded it yet)"
        allowed = FINISHED_SERIES | (FAILED_SERIES if include_failed else set())
        if record.state not in allowed:
            return f"series {record.state}"
        ended = FINISHED_JOBS | (FAILED_JOBS if include_failed else set())
        for job in self.ledger.jobs_of_series(record.series_uid, current=None):
            if any(d.state != "delivered" for d in self.ledger.deliveries_of(job.job_id)):
                return "results not delivered"
            if job.state not in ended:
                return f"a job {job.state}"
        if record.study_models:
            study = self.ledger.study(record.study_uid)
            if study is None or study.waiting:
                return "a study model waits for its study"
        return ""

    def series_activity(self, record: Series, folder: Path) -> float:
        jobs = self.ledger.jobs_of_series(record.series_uid, current=None)
        return max([record.last_seen, _newest_mtime(folder), *(_job_activity(j) for j in jobs)])

    def outbox_hold(self, job_id: str) -> tuple[str, float]:
        """Why a job's outbox folder must stay ('' when it may go), and its last activity."""
        job = self.ledger.job(job_id)
        found = self.ledger.deliveries_of(job_id) if job is not None else []
        if not found:
            return "no delivery in the ledger", 0.0
        if any(d.state != "delivered" for d in found):
            return "results not delivered", 0.0
        if job is None or job.state != JobState.DONE.value:
            return "job not done", 0.0
        return "", max([_job_activity(job), *(d.delivered_at for d in found)])


class Retention:
    """Plans and performs the removal of finished, delivered folders older than a retention time."""

    def __init__(self, layout: DataLayout, ledger: Ledger, include_failed: bool = False):
        self.layout = layout
        self.ledger = ledger
        self.include_failed = include_failed
        self.facts = _Facts(ledger)

    def plan(self, older_than: float, now: float | None = None) -> RetentionPlan:
        """The spool and outbox folders that may go: finished, delivered and idle for ``older_than`` s."""
        now = self.ledger.now() if now is None else now
        layout, facts = self.layout, self.facts
        removals: list[Removal] = []
        kept: dict[str, int] = {}
        for folder in sorted(p for p in layout.spool.glob("*") if p.is_dir() and is_valid_uid(p.name)):
            record = self.ledger.series(folder.name)
            age = now - (facts.series_activity(record, folder) if record else _newest_mtime(folder))
            if age < older_than:
                continue
            hold = facts.series_hold(record, self.include_failed)
            if hold:
                kept[hold] = kept.get(hold, 0) + 1
            else:
                removals.append(Removal("series", folder.name, folder, folder_bytes(folder), age))
        for folder in sorted(p for p in layout.outbox.glob("*") if p.is_dir()):
            hold, activity = facts.outbox_hold(folder.name)
            if hold:
                if now - _newest_mtime(folder) >= older_than:
                    kept[hold] = kept.get(hold, 0) + 1
                continue
            age = now - activity
            if age >= older_than:
                removals.append(Removal("outbox", folder.name, folder, folder_bytes(folder), age))
        return RetentionPlan(removals, kept)

    def remove(self, removal: Removal) -> bool:
        """Remove one planned folder; returns False when it had to stay after all.

        A series' folder is renamed aside once the ledger, read again, still says it may go; then
        the ledger is read once more: a series received again meanwhile (receiving, or instances
        newer than its last) gets its folder back, and stays.
        """
        if removal.kind == "outbox":
            shutil.rmtree(removal.path, ignore_errors=True)
            return True
        record = self.ledger.series(removal.uid)
        if record is None or self.facts.series_hold(record, self.include_failed):
            return False
        aside = self.layout.root / ".cleanup" / removal.uid
        aside.parent.mkdir(exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)  # a leftover of an interrupted run
        os.rename(removal.path, aside)
        return _discard_aside(self.layout, aside, record, self.ledger.series(removal.uid))


def _discard_aside(layout: DataLayout, aside: Path, record: Series, now: Series | None) -> bool:
    """Delete a series folder moved aside, unless the series was received again since ``record`` was
    read (``now``: the ledger's row after the move) or instances arrived after it was routed."""
    again = now is not None and (now.state == SeriesState.RECEIVING.value or now.last_seen > record.last_seen)
    late = [p for p in aside.iterdir() if p.stat().st_mtime > record.last_seen + 1.0]
    if again or late:
        folder = layout.series_dir(aside.name)
        folder.mkdir(parents=True, exist_ok=True)
        for path in aside.iterdir():
            os.replace(path, folder / path.name)
        log.warning("series %s was received again during cleanup (%d new instance(s)); kept", aside.name, len(late))
    shutil.rmtree(aside, ignore_errors=True)
    return not (again or late)


def recover_aside(layout: DataLayout, ledger: Ledger) -> None:
    """Finish what an interrupted cleanup left under ``.cleanup/`` (restoring late instances)."""
    root = layout.root / ".cleanup"
    if not root.is_dir():
        return
    for aside in sorted(p for p in root.iterdir() if p.is_dir()):
        record = ledger.series(aside.name) if is_valid_uid(aside.name) else None
        if record is None:
            shutil.rmtree(aside, ignore_errors=True)
            continue
        _discard_aside(layout, aside, record, record)


def human_size(count: int) -> str:
    """``12.3 MiB``: a byte count for people."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
