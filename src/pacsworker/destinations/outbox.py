"""The outbox's delivery bookkeeping: one attempt over a job's destinations, backoff, dead letters.

The result files stay in ``outbox/<job_id>/``; the ledger holds an outcome per destination and per
instance. An attempt sends each due destination only the instances it has not confirmed. A
retryable failure waits ``backoff_base_seconds * 2**(attempts-1)`` (at most ``backoff_max_seconds``,
with "equal jitter": half of it fixed, half random; at least what a Retry-After asked) until
``delivery.max_age_seconds`` after the first attempt; then, or at once on a permanent failure, the
destination is dead-lettered: the files stay, ``pacsworker status`` shows why, and
``pacsworker deliveries retry`` starts it again.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pydicom

from .. import metrics
from ..config import Settings
from ..ledger import Delivery, Ledger, open_ledger
from ..records import DataLayout, DeliveryState
from . import send
from .outcome import DeliveryError, InstanceResult, Verdict

log = logging.getLogger("pacsworker.delivery")

PENDING, DELIVERED, DEAD_LETTER = (s.value for s in DeliveryState)


class Superseded(Exception):
    """Another deliver message is in charge of this job (the sweep or the operator sent a new one)."""


def backoff_seconds(settings: Settings, attempts: int, retry_after: float | None = None) -> float:
    """The wait after the ``attempts``-th failed attempt: exponential, capped, half of it random."""
    d = settings.delivery
    ceiling = min(d.backoff_max_seconds, d.backoff_base_seconds * 2 ** min(max(attempts - 1, 0), 30))
    wait = ceiling / 2 + random.uniform(0, ceiling / 2)
    return max(wait, retry_after or 0.0)


def attempt_delivery(settings: Settings, layout: DataLayout, job_id: str, task_id: str = "") -> list[Delivery] | None:
    """Try every destination of a job that is due; record the outcomes in the ledger. Returns the
    job's deliveries afterwards; None: the job has no results waiting.

    ``task_id`` names the deliver message making the attempt: the first one takes charge of the job,
    and one that a newer message replaced (see :meth:`Ledger.hand_over`) makes none.

    Raises
    ------
    Superseded
        When another deliver message is in charge of the job.
    """
    ledger = open_ledger(settings, "worker")
    if task_id and not ledger.take_delivery(job_id, task_id):
        raise Superseded(job_id)
    outcomes = ledger.deliveries_of(job_id)
    if not outcomes:
        return None
    now = ledger.now()
    folder = layout.job_outbox(job_id)
    instances = ledger.delivered_instances(job_id)
    attempted = False
    for outcome in outcomes:
        if outcome.state == PENDING and outcome.next_attempt_at <= now:
            mine = [i for i in instances if i.destination == outcome.destination]
            _attempt(settings, ledger, job_id, folder, outcome, mine)
            attempted = True
    outcomes = ledger.deliveries_of(job_id)
    if attempted and not any(o.state == PENDING for o in outcomes):
        dead = any(o.state == DEAD_LETTER for o in outcomes)
        log.log(logging.WARNING if dead else logging.INFO, "%s", where_results_went(settings, layout, job_id))
    return outcomes


def where_results_went(settings: Settings, layout: DataLayout, job_id: str) -> str:
    """One line for a job whose delivery settled: each destination, where it is, how many instances."""
    from ..start_up import destination_where

    ledger = open_ledger(settings, "worker")
    job = ledger.job(job_id)
    instances = ledger.delivered_instances(job_id)
    delivered, dead = [], []
    for outcome in ledger.deliveries_of(job_id):
        name = outcome.destination
        destination = settings.destination(name)
        where = destination_where(destination) if destination is not None else "no longer configured"
        if destination is not None and destination.kind == "folder" and job is not None:
            where += f"/{job.study_uid}/"
        mine = [i for i in instances if i.destination == name]
        stored = sum(1 for i in mine if i.state == DELIVERED)
        if outcome.state == DELIVERED:
            delivered.append(f"{stored} instance(s) to {name} ({where})")
        else:
            dead.append(f"{name} ({where}), {stored} of {len(mine)} stored: {outcome.last_error}")
    line = f"job {job_id}: results delivered: {', '.join(delivered) or 'nowhere'}"
    if dead:
        line += f"; dead-lettered: {'; '.join(dead)} (the files stay in {layout.job_outbox(job_id)})"
    return line


def _attempt(settings: Settings, ledger: Ledger, job_id: str, folder: Path, outcome: Delivery, instances) -> None:
    name = outcome.destination
    uids = {i.file_name: i.sop_instance_uid for i in instances}
    todo = [i.file_name for i in instances if i.state != DELIVERED]
    destination = settings.destination(name)
    if destination is None:
        reason = f"destination {name} is no longer configured"
        ledger.dead_letter(job_id, name, reason)
        metrics.DELIVERIES.labels(name, "permanent-failure").inc()
        log.error("job %s: delivery to %s dead-lettered: %s", job_id, name, reason)
        return
    retry_after = None
    try:
        results = send(destination, [folder / file for file in todo]) if todo else []
    except DeliveryError as exc:
        results, retry_after = exc.results([folder / file for file in todo]), exc.retry_after
    stored = {r.path.name: r.detail for r in results if r.verdict == Verdict.STORED}
    failures = [r for r in results if r.verdict != Verdict.STORED]
    for result in results:
        if result.verdict == Verdict.STORED and result.detail not in ("stored", ""):
            log.warning("job %s: %s: instance %s %s", job_id, name, _uid(uids, result.path), result.detail)
    permanent = [r for r in failures if r.verdict == Verdict.PERMANENT]
    error = _summary(uids, permanent or failures, len(todo)) if failures else ""
    attempts = outcome.attempts + 1
    state = ledger.record_attempt(
        job_id, name, stored, {r.path.name: r.detail for r in failures}, error=error, permanent=bool(permanent),
        retry_in=backoff_seconds(settings, attempts, retry_after), max_age=settings.delivery.max_age_seconds)
    if state == DELIVERED:
        metrics.DELIVERIES.labels(name, "delivered").inc()
        job = ledger.job(job_id)
        if job is not None and job.delivery_started_at:
            metrics.observe_stage("deliver", max(0.0, ledger.now() - job.delivery_started_at))
        log.info("job %s delivered to %s (%d instance(s) this attempt, %d in all)", job_id, name, len(todo),
                 len(instances))
    elif state == DEAD_LETTER and permanent:
        metrics.DELIVERIES.labels(name, "permanent-failure").inc()
        log.error("job %s: delivery to %s failed permanently, dead-lettered (fix it, then `pacsworker deliveries "
                  "retry %s`): %s", job_id, name, job_id, error)
    elif state == DEAD_LETTER:
        metrics.DELIVERIES.labels(name, "dead-letter").inc()
        row = next((o for o in ledger.deliveries_of(job_id) if o.destination == name), None)
        log.error("job %s: delivery to %s dead-lettered (delivery.max_age_seconds reached; `pacsworker deliveries "
                  "retry %s` starts it again): %s", job_id, name, job_id, row.last_error if row is not None else error)
    elif state == PENDING:
        metrics.DELIVERIES.labels(name, "retry").inc()
        row = next((o for o in ledger.deliveries_of(job_id) if o.destination == name), None)
        wait = row.next_attempt_at - ledger.now() if row is not None else 0.0
        log.warning("job %s: delivery failed to %s (%s); attempt %d, retry in %.1f s", job_id, name, error,
                    attempts, max(0.0, wait))


def _summary(uids: dict[str, str], failures: list[InstanceResult], sent: int) -> str:
    """One line: the reason, and which instances it concerns when not all that were sent."""
    reasons: dict[str, list[str]] = {}
    for result in failures:
        reasons.setdefault(result.detail, []).append(_uid(uids, result.path))
    parts = []
    for reason, found in reasons.items():
        parts.append(reason if len(found) == sent else f"{reason} ({len(found)} of {sent}: {', '.join(found[:3])}"
                     f"{', ...' if len(found) > 3 else ''})")
    return "; ".join(parts)


def _uid(uids: dict[str, str], path: Path) -> str:
    uid = uids.get(path.name)
    if uid is None:
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        except Exception:  # noqa: BLE001 - a name is enough to point at the file
            uid = path.name
    return uid


def retry_delivery(settings: Settings, job_id: str, operator: str = "") -> tuple[list[str], str]:
    """Make a job's dead-lettered (and waiting) destinations due now, with a fresh max age.

    Returns the names of the destinations made due (empty when everything was delivered), and the
    task id the deliver message to send must have (it takes charge; an older one is dropped).
    """
    return open_ledger(settings, "cli").retry_delivery(job_id, operator)
