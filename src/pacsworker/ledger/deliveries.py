"""Transitions of a job's results in the outbox: per destination and instance, backoff, dead letters."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update

from ..records import DeliveryState, JobState
from .core import LedgerCore, Tx, retried
from .database import db_now
from .jobs import DELIVERING, job_series_uids
from .schema import EventKind, deliveries, delivery_instances, jobs
from .series import _settle_series

PENDING, DELIVERED, DEAD_LETTER = (s.value for s in DeliveryState)


class DeliveryTransitions(LedgerCore):
    @retried
    def take_delivery(self, job_id: str, task_id: str) -> bool:
        """The deliver message ``task_id`` takes charge of a job's delivery; False: another one is in
        charge (this one is a duplicate, or was replaced by the sweep or the operator)."""
        with self._write() as tx:
            query = update(jobs).where(jobs.c.job_id == job_id,
                                       jobs.c.delivery_task.in_(["", task_id])).values(delivery_task=task_id)
            return tx.conn.execute(query).rowcount == 1

    @retried
    def record_attempt(self, job_id: str, destination: str, stored: dict[str, str], failed: dict[str, str], *,
                       error: str = "", permanent: bool = False, retry_in: float = 0.0, max_age: float = 0.0) -> str:
        """One attempt at one destination: ``stored`` and ``failed`` (outbox file name -> what the
        destination said). Every instance stored: delivered. Else dead-lettered when ``permanent``
        or once ``max_age`` s passed since the delivery started (database clock); else pending
        again in ``retry_in`` s. The job settles when no destination is pending. Returns the
        destination's new state ('' when it was not pending).
        """
        with self._write() as tx:
            tx.locked(jobs, job_id=job_id)  # the job first, as every transition of it does: no deadlock
            row = tx.locked(deliveries, job_id=job_id, destination=destination)
            if row is None or row.state != PENDING:
                return ""
            for files, state in ((stored, DELIVERED), (failed, PENDING)):
                for file, detail in files.items():
                    values: dict[str, Any] = {"detail": detail, "state": state}
                    if state == DELIVERED:
                        values["delivered_at"] = db_now()
                    tx.conn.execute(update(delivery_instances).where(
                        delivery_instances.c.job_id == job_id, delivery_instances.c.destination == destination,
                        delivery_instances.c.file_name == file).values(**values))
            missing = tx.conn.execute(select(delivery_instances.c.file_name).where(
                delivery_instances.c.job_id == job_id, delivery_instances.c.destination == destination,
                delivery_instances.c.state != DELIVERED).limit(1)).first()
            attempts = row.attempts + 1
            key = {"job_id": job_id, "destination": destination}
            if missing is None:
                tx.swap(deliveries, key, PENDING, state=DELIVERED, attempts=attempts, delivered_at=db_now(),
                        last_error="", permanent=False, next_attempt_at=0)
                state = DELIVERED
                tx.event(EventKind.DELIVERED, job_id=job_id, destination=destination, state=state, count=len(stored))
            else:
                started = tx.conn.execute(select(jobs.c.delivery_started_at).where(jobs.c.job_id == job_id)).scalar_one()
                age = float(tx.conn.execute(select(db_now() - started)).scalar_one())
                expired = max_age > 0 and age >= max_age
                if permanent or expired:
                    why = error if permanent else f"gave up after {attempts} attempts in {_age(age)}: {error}"
                    _dead_letter(tx, row, why, permanent, attempts)
                    state = DEAD_LETTER
                else:
                    tx.swap(deliveries, key, PENDING, attempts=attempts, last_error=error,
                            next_attempt_at=db_now() + retry_in)
                    state = PENDING
            tx.move("delivery", destination, PENDING, state)
            _settle_job(tx, job_id)
            return state

    @retried
    def dead_letter(self, job_id: str, destination: str, reason: str, permanent: bool = True) -> bool:
        """Give up on a pending destination at once (it is no longer configured, say)."""
        with self._write() as tx:
            tx.locked(jobs, job_id=job_id)
            row = tx.locked(deliveries, job_id=job_id, destination=destination)
            if row is None or row.state != PENDING:
                return False
            _dead_letter(tx, row, reason, permanent, row.attempts)
            tx.move("delivery", destination, PENDING, DEAD_LETTER)
            _settle_job(tx, job_id)
            return True

    @retried
    def retry_delivery(self, job_id: str, operator: str = "") -> tuple[list[str], str]:
        """An operator sends a job's undelivered results again: every destination not delivered is
        due now, with a fresh max age, under a new deliver message (whose task id is returned)."""
        with self._write() as tx:
            job = tx.locked(jobs, job_id=job_id)
            rows = tx.conn.execute(select(deliveries).where(deliveries.c.job_id == job_id, deliveries.c.state != DELIVERED)
                                   .order_by(deliveries.c.destination).with_for_update()).all()
            if job is None or not rows:
                return [], ""
            task_id = uuid.uuid4().hex
            for row in rows:
                tx.swap(deliveries, {"job_id": job_id, "destination": row.destination}, row.state, state=PENDING,
                        next_attempt_at=db_now(), permanent=False, dead_lettered_at=0)
                tx.move("delivery", row.destination, row.state, PENDING)
            tx.swap(jobs, {"job_id": job_id}, job.state, state=DELIVERING, reason="", delivery_task=task_id,
                    delivery_started_at=db_now())
            tx.move("job", job.model, job.state, DELIVERING)
            names = [row.destination for row in rows]
            tx.event(EventKind.RETRIED, job_id=job_id, state=DELIVERING, count=len(names),
                     actor=operator or tx.actor, reason=f"delivery to {', '.join(names)}")
            _settle_series(tx, job_series_uids(tx, job_id))
            return names, task_id

    @retried
    def hand_over(self, job_id: str, stale_after: float) -> str | None:
        """For the recovery sweep: a pending delivery overdue by more than ``stale_after`` s (its
        message was lost) gets a new deliver message in charge, whose task id is returned."""
        with self._write() as tx:
            overdue = tx.conn.execute(select(deliveries.c.destination).where(
                deliveries.c.job_id == job_id, deliveries.c.state == PENDING,
                deliveries.c.next_attempt_at < db_now() - stale_after)).first()
            if overdue is None:
                return None
            task_id = uuid.uuid4().hex
            tx.conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(delivery_task=task_id))
            tx.conn.execute(update(deliveries).where(deliveries.c.job_id == job_id, deliveries.c.state == PENDING)
                            .values(next_attempt_at=db_now() + stale_after))
            return task_id


def _age(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def _dead_letter(tx: Tx, row, reason: str, permanent: bool, attempts: int) -> None:
    tx.swap(deliveries, {"job_id": row.job_id, "destination": row.destination}, PENDING, state=DEAD_LETTER,
            attempts=attempts, last_error=reason, permanent=permanent, dead_lettered_at=db_now(), next_attempt_at=0)
    tx.event(EventKind.DEAD_LETTERED, job_id=row.job_id, destination=row.destination, state=DEAD_LETTER,
             count=attempts, reason=reason)


def _settle_job(tx: Tx, job_id: str) -> None:
    """A delivering job whose destinations all settled: done when each has it, else failed with why."""
    job = tx.locked(jobs, job_id=job_id)
    if job is None or job.state != DELIVERING:
        return
    outcomes = tx.conn.execute(select(deliveries.c.destination, deliveries.c.state, deliveries.c.last_error)
                               .where(deliveries.c.job_id == job_id)).all()
    if any(o.state == PENDING for o in outcomes):
        return
    dead = [o for o in outcomes if o.state == DEAD_LETTER]
    if dead:
        state = JobState.FAILED.value
        reason = (f"delivery dead-lettered (`pacsworker deliveries retry {job_id}`): "
                  + "; ".join(f"{o.destination}: {o.last_error}" for o in dead))
    else:
        state, reason = JobState.DONE.value, ""
    tx.swap(jobs, {"job_id": job_id}, DELIVERING, state=state, reason=reason,
            timings={**job.timings, "delivered_at": tx.conn.execute(select(db_now())).scalar_one()} if not dead
            else job.timings)
    tx.move("job", job.model, DELIVERING, state)
    _settle_series(tx, job_series_uids(tx, job_id))
