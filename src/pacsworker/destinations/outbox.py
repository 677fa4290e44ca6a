"""The outbox's delivery bookkeeping: one attempt over a job's destinations, backoff, dead letters.

``outbox/<job_id>/delivery.json`` (:class:`DeliveryRecord`) holds an outcome per destination and per
instance. An attempt sends each due destination only the instances it has not confirmed. A
retryable failure waits ``backoff_base_seconds * 2**(attempts-1)`` (at most ``backoff_max_seconds``,
with "equal jitter": half of it fixed, half random; at least what a Retry-After asked) until
``delivery.max_age_seconds`` after the first attempt; then, or at once on a permanent failure, the
destination is dead-lettered: the files stay, ``pacsworker status`` shows why, and
``pacsworker deliveries retry`` starts it again.
"""

from __future__ import annotations

import fcntl
import logging
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom

from .. import metrics
from ..config import Settings
from ..records import (
    DataLayout,
    DeliveryRecord,
    DeliveryState,
    DestinationOutcome,
    InstanceOutcome,
    read_json,
    write_json_atomic,
)
from . import send
from .outcome import DeliveryError, InstanceResult, Verdict

log = logging.getLogger("pacsworker.delivery")


class OutboxBusy(Exception):
    """Another process or thread is delivering this job right now."""


class Superseded(Exception):
    """Another deliver message is in charge of this job (the sweep or the operator sent a new one)."""


@contextmanager
def outbox_lock(layout: DataLayout, job_id: str, wait: bool = False) -> Iterator[None]:
    """Serialise work on one job's outbox (delivery attempts, sweeps, retries) across processes.

    Raises
    ------
    OutboxBusy
        Without ``wait``, when someone else holds it.
    """
    folder = layout.job_outbox(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutboxBusy(job_id) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def backoff_seconds(settings: Settings, attempts: int, retry_after: float | None = None) -> float:
    """The wait after the ``attempts``-th failed attempt: exponential, capped, half of it random."""
    d = settings.delivery
    ceiling = min(d.backoff_max_seconds, d.backoff_base_seconds * 2 ** min(max(attempts - 1, 0), 30))
    wait = ceiling / 2 + random.uniform(0, ceiling / 2)
    return max(wait, retry_after or 0.0)


def attempt_delivery(
    settings: Settings, layout: DataLayout, job_id: str, now: float | None = None, task_id: str = ""
) -> DeliveryRecord | None:
    """Try every destination of a job that is due; record the outcomes. None: the job has no outbox record.

    ``task_id`` names the deliver message making the attempt: the first one takes charge of the job,
    and one that a newer message replaced (see :func:`hand_over`) makes none.

    Raises
    ------
    OutboxBusy
        When another worker is delivering the same job at this moment.
    Superseded
        When another deliver message is in charge of the job.
    """
    with outbox_lock(layout, job_id):
        record = read_json(layout.delivery_record(job_id), DeliveryRecord)
        if record is None:
            return None
        if task_id:
            if record.task_id and record.task_id != task_id:
                raise Superseded(job_id)
            record.task_id = task_id
        now = time.time() if now is None else now
        folder = layout.job_outbox(job_id)
        attempted = False
        for name, outcome in record.destinations.items():
            if outcome.state == DeliveryState.PENDING and outcome.next_attempt_at <= now:
                _attempt(settings, record, folder, name, outcome, now)
                attempted = True
        pending = [o.next_attempt_at for o in record.destinations.values() if o.state == DeliveryState.PENDING]
        record.next_attempt_at = min(pending) if pending else 0.0
        write_json_atomic(layout.delivery_record(job_id), record)
        if attempted and not pending:
            log.log(logging.WARNING if record.dead_lettered else logging.INFO, "%s",
                    where_results_went(settings, layout, record))
        return record


def where_results_went(settings: Settings, layout: DataLayout, record: DeliveryRecord) -> str:
    """One line for a job whose delivery settled: each destination, where it is, how many instances."""
    from ..records import JobRecord
    from ..start_up import destination_where

    job = read_json(layout.job_record(record.job_id), JobRecord)
    delivered, dead = [], []
    for name, outcome in record.destinations.items():
        destination = settings.destination(name)
        where = destination_where(destination) if destination is not None else "no longer configured"
        if destination is not None and destination.kind == "folder" and job is not None:
            where += f"/{job.study_uid}/"
        stored = sum(1 for i in outcome.instances.values() if i.state == DeliveryState.DELIVERED)
        if outcome.state == DeliveryState.DELIVERED:
            delivered.append(f"{stored} instance(s) to {name} ({where})")
        else:
            dead.append(f"{name} ({where}), {stored} of {len(record.files)} stored: {outcome.last_error}")
    line = f"job {record.job_id}: results delivered: {', '.join(delivered) or 'nowhere'}"
    if dead:
        line += f"; dead-lettered: {'; '.join(dead)} (the files stay in {layout.job_outbox(record.job_id)})"
    return line


def _attempt(settings: Settings, record: DeliveryRecord, folder: Path, name: str, outcome: DestinationOutcome,
             now: float) -> None:
    job_id = record.job_id
    for file in record.files:
        outcome.instances.setdefault(file, InstanceOutcome())
    todo = [file for file in record.files if outcome.instances[file].state != DeliveryState.DELIVERED]
    destination = settings.destination(name)
    outcome.attempts += 1
    retry_after = None
    if destination is None:
        results = DeliveryError(f"destination {name} is no longer configured", permanent=True).results(
            [folder / file for file in todo])
    else:
        try:
            results = send(destination, [folder / file for file in todo]) if todo else []
        except DeliveryError as exc:
            results, retry_after = exc.results([folder / file for file in todo]), exc.retry_after
    _record_results(outcome, results, now)
    failures = [r for r in results if r.verdict != Verdict.STORED]
    warnings = [r for r in results if r.verdict == Verdict.STORED and r.detail not in ("stored", "")]
    for result in warnings:
        log.warning("job %s: %s: instance %s %s", job_id, name, _uid(record, result.path), result.detail)
    if not failures:
        outcome.state, outcome.delivered_at = DeliveryState.DELIVERED, now
        outcome.last_error, outcome.permanent = "", False
        metrics.DELIVERIES.labels(name, "delivered").inc()
        metrics.observe_stage("deliver", time.time() - record.started_at)
        log.info("job %s delivered to %s (%d instance(s) this attempt, %d in all)", job_id, name, len(todo),
                 len(record.files))
        return
    permanent = [r for r in failures if r.verdict == Verdict.PERMANENT]
    shown = permanent or failures
    outcome.last_error = _summary(record, shown, len(todo))
    outcome.permanent = bool(permanent)
    if permanent:
        _dead_letter(outcome, now)
        metrics.DELIVERIES.labels(name, "permanent-failure").inc()
        log.error("job %s: delivery to %s failed permanently, dead-lettered (fix it, then `pacsworker deliveries "
                  "retry %s`): %s", job_id, name, job_id, outcome.last_error)
        return
    deadline = record.started_at + settings.delivery.max_age_seconds
    if now >= deadline:
        _dead_letter(outcome, now)
        metrics.DELIVERIES.labels(name, "dead-letter").inc()
        outcome.last_error = (f"gave up after {outcome.attempts} attempts in {_age(now - record.started_at)}: "
                              f"{outcome.last_error}")
        log.error("job %s: delivery to %s dead-lettered (delivery.max_age_seconds reached; `pacsworker deliveries "
                  "retry %s` starts it again): %s", job_id, name, job_id, outcome.last_error)
        return
    metrics.DELIVERIES.labels(name, "retry").inc()
    wait = backoff_seconds(settings, outcome.attempts, retry_after)
    outcome.next_attempt_at = min(now + wait, deadline)
    log.warning("job %s: delivery failed to %s (%s); attempt %d, retry in %.1f s", job_id, name, outcome.last_error,
                outcome.attempts, outcome.next_attempt_at - now)


def _record_results(outcome: DestinationOutcome, results: list[InstanceResult], now: float) -> None:
    for result in results:
        instance = outcome.instances[result.path.name]
        instance.detail = result.detail
        if result.verdict == Verdict.STORED:
            instance.state, instance.delivered_at = DeliveryState.DELIVERED, now


def _dead_letter(outcome: DestinationOutcome, now: float) -> None:
    outcome.state, outcome.dead_lettered_at, outcome.next_attempt_at = DeliveryState.DEAD_LETTER, now, 0.0


def _summary(record: DeliveryRecord, failures: list[InstanceResult], sent: int) -> str:
    """One line: the reason, and which instances it concerns when not all that were sent."""
    reasons: dict[str, list[str]] = {}
    for result in failures:
        reasons.setdefault(result.detail, []).append(_uid(record, result.path))
    parts = []
    for reason, uids in reasons.items():
        parts.append(reason if len(uids) == sent else f"{reason} ({len(uids)} of {sent}: {', '.join(uids[:3])}"
                     f"{', ...' if len(uids) > 3 else ''})")
    return "; ".join(parts)


def _uid(record: DeliveryRecord, path: Path) -> str:
    uid = record.sop_instance_uids.get(path.name)
    if uid is None:
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        except Exception:  # noqa: BLE001 - a name is enough to point at the file
            uid = path.name
    return uid


def _age(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def retry_delivery(layout: DataLayout, job_id: str, now: float | None = None) -> tuple[list[str], str]:
    """Make a job's dead-lettered (and waiting) destinations due now, with a fresh max age.

    Returns the names of the destinations made due (empty when everything was delivered), and the
    task id the deliver message to send must have (it takes charge; an older one is dropped).
    """
    now = time.time() if now is None else now
    with outbox_lock(layout, job_id, wait=True):
        record = read_json(layout.delivery_record(job_id), DeliveryRecord)
        if record is None:
            raise FileNotFoundError(f"no outbox record for job {job_id} in {layout.outbox}")
        names = []
        for name, outcome in record.destinations.items():
            if outcome.state != DeliveryState.DELIVERED:
                outcome.state, outcome.next_attempt_at, outcome.permanent = DeliveryState.PENDING, 0.0, False
                outcome.dead_lettered_at = 0.0
                names.append(name)
        if names:
            record.started_at = record.next_attempt_at = now
            record.task_id = uuid.uuid4().hex
            write_json_atomic(layout.delivery_record(job_id), record)
        return names, record.task_id


def hand_over(layout: DataLayout, job_id: str, now: float, stale: float) -> str | None:
    """For the recovery sweep: if a pending delivery is overdue by more than ``stale`` seconds (its
    message was lost), name a new deliver message in charge and return its task id; else None.
    The next hand-over can come ``stale`` seconds later at the earliest."""
    try:
        with outbox_lock(layout, job_id):
            record = read_json(layout.delivery_record(job_id), DeliveryRecord)
            if record is None or not record.pending or now - record.next_attempt_at <= stale:
                return None
            record.task_id, record.next_attempt_at = uuid.uuid4().hex, now + stale
            write_json_atomic(layout.delivery_record(job_id), record)
            return record.task_id
    except OutboxBusy:
        return None  # a worker is delivering it right now
