"""Transitions of model jobs: made, sent, claimed, beating, finished, re-queued, retried."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert, select

from ..records import JobState
from .core import LedgerCore, retried
from .database import db_now
from .rows import Claim, Job, NewJob, from_row
from .schema import EventKind, deliveries, delivery_instances, jobs
from .series import _make_job, _settle_series, job_series

QUEUED, RUNNING, DELIVERING, FAILED = (s.value for s in (JobState.QUEUED, JobState.RUNNING, JobState.DELIVERING,
                                                          JobState.FAILED))
PENDING = "pending"
RETRYABLE = {s.value for s in (JobState.FAILED, JobState.NO_RESULT, JobState.IMPLAUSIBLE)}
FINISHED = {s.value for s in (JobState.DELIVERING, JobState.DONE, JobState.NO_RESULT, JobState.IMPLAUSIBLE,
                              JobState.FAILED)}


def job_series_uids(tx, job_id: str) -> list[str]:
    return list(tx.conn.execute(select(job_series.c.series_uid).where(job_series.c.job_id == job_id)).scalars())


class JobTransitions(LedgerCore):
    @retried
    def create_job(self, job: NewJob) -> bool:
        """Make one job (idempotent by its id; a failed one is queued again). True: it is to be sent."""
        with self._write() as tx:
            made = _make_job(tx, job)
            _settle_series(tx, job.inputs)
            return made

    @retried
    def mark_sent(self, job_id: str) -> bool:
        """The broker took the job's message (by the database's clock). False: the job is not queued."""
        with self._write() as tx:
            won = tx.swap(jobs, {"job_id": job_id}, QUEUED, sent_at=db_now())
            if won:
                tx.event(EventKind.SENT, job_id=job_id, state=QUEUED)
            return won

    @retried
    def mark_unsent(self, job_id: str) -> bool:
        """The broker refused the job's message: the recovery sweep sends it at once."""
        with self._write() as tx:
            return tx.swap(jobs, {"job_id": job_id}, QUEUED, sent_at=0)

    @retried
    def claim_job(self, job_id: str, worker: str, max_attempts: int, stale_after: float) -> Claim:
        """Take a job for ``worker``: queued, or running with a heartbeat older than ``stale_after`` s
        (by the database's clock). Exactly one of several claimants wins. A job out of attempts fails.
        """
        with self._write() as tx:
            row = tx.locked(jobs, job_id=job_id)
            if row is None:
                return Claim(False, "missing")
            stale = row.state == RUNNING and tx.conn.execute(
                select(db_now() - jobs.c.heartbeat > stale_after).where(jobs.c.job_id == job_id)).scalar_one()
            if row.state != QUEUED and not stale:
                return Claim(False, row.state)
            if row.attempts >= max_attempts:
                reason = f"gave up after {row.attempts} attempts (worker lost each time)"
                tx.swap(jobs, {"job_id": job_id}, row.state, state=FAILED, reason=reason, finished_at=db_now(), stage="")
                tx.move("job", row.model, row.state, FAILED)
                tx.event(EventKind.FINISHED, job_id=job_id, state=FAILED, count=row.attempts, reason=reason)
                _settle_series(tx, job_series_uids(tx, job_id))
                return Claim(False, FAILED)
            tx.swap(jobs, {"job_id": job_id}, row.state, state=RUNNING, attempts=row.attempts + 1, worker=worker,
                    heartbeat=db_now(), started_at=db_now(), traceback="", stage="")
            tx.move("job", row.model, row.state, RUNNING)
            tx.event(EventKind.STARTED, job_id=job_id, state=RUNNING, count=row.attempts + 1, actor=worker)
            return Claim(True, RUNNING, from_row(Job, tx.locked(jobs, job_id=job_id)))

    @retried
    def heartbeat(self, job_id: str, worker: str, attempt: int, stage: str | None = None) -> bool:
        """A running job's worker is alive (database clock). False: the job is no longer this
        worker's attempt (taken over, or ended): stop beating."""
        with self._write() as tx:
            query = jobs.update().where(jobs.c.job_id == job_id, jobs.c.state == RUNNING, jobs.c.worker == worker,
                                        jobs.c.attempts == attempt)
            values = {"heartbeat": db_now()} if stage is None else {"heartbeat": db_now(), "stage": stage}
            return tx.conn.execute(query.values(**values)).rowcount == 1

    @retried
    def finish_job(self, job_id: str, worker: str, attempt: int, state: JobState | str, *, reason: str = "",
                   traceback: str = "", outputs: dict | None = None, values: dict | None = None,
                   timings: dict | None = None, implausible: list | None = None, notes: list | None = None,
                   results: dict[str, str] | None = None, destinations: Sequence[str] = ()) -> bool:
        """End this worker's attempt of a job. ``state`` delivering: ``results`` (outbox file name ->
        SOP Instance UID) wait for each of ``destinations``. False: the attempt was taken over (its
        results are to be dropped). The job's series settle in the same transaction.
        """
        state = JobState(state).value
        if state not in FINISHED:
            raise ValueError(f"job {job_id}: {state} is not how a job ends")
        if state == DELIVERING and not (results and destinations):
            raise ValueError(f"job {job_id}: delivering needs results and destinations")
        with self._write() as tx:
            row = tx.locked(jobs, job_id=job_id)
            if row is None or (row.state, row.worker, row.attempts) != (RUNNING, worker, attempt):
                return False
            tx.swap(jobs, {"job_id": job_id}, RUNNING, state=state, reason=reason, traceback=traceback, stage="",
                    finished_at=db_now(), outputs=outputs or {}, values=values or {},
                    timings={**row.timings, **(timings or {})}, implausible=implausible or [], notes=notes or [],
                    delivery_started_at=db_now() if state == DELIVERING else 0, delivery_task="")
            tx.move("job", row.model, RUNNING, state)
            tx.event(EventKind.FINISHED, job_id=job_id, state=state, count=attempt, reason=reason, actor=worker)
            if state == DELIVERING:
                _await_delivery(tx, job_id, results or {}, destinations)
            _settle_series(tx, job_series_uids(tx, job_id))
            return True

    @retried
    def requeue_stale(self, stale_after: float, limit: int = 100) -> list[str]:
        """Running jobs whose heartbeat is older than ``stale_after`` s (database clock): queued again,
        to be sent. Costs O(jobs due), never O(history)."""
        with self._write() as tx:
            due = tx.conn.execute(
                select(jobs.c.job_id, jobs.c.model, jobs.c.worker)
                .where(jobs.c.state == RUNNING, jobs.c.heartbeat < db_now() - stale_after)
                .order_by(jobs.c.heartbeat).limit(limit)).all()
            requeued = []
            for job in due:
                if tx.swap(jobs, {"job_id": job.job_id}, RUNNING, state=QUEUED, sent_at=0, stage=""):
                    tx.move("job", job.model, RUNNING, QUEUED)
                    tx.event(EventKind.REQUEUED, job_id=job.job_id, state=QUEUED,
                             reason=f"worker {job.worker} silent for more than {stale_after:g} s")
                    requeued.append(job.job_id)
            return requeued

    @retried
    def retry_job(self, job_id: str, operator: str = "") -> bool:
        """An operator runs a failed, no-result or withheld job again from the start. False: it had not ended so."""
        with self._write() as tx:
            row = tx.locked(jobs, job_id=job_id)
            if row is None or row.state not in RETRYABLE:
                return False
            tx.swap(jobs, {"job_id": job_id}, row.state, state=QUEUED, attempts=0, sent_at=0, reason="", stage="",
                    traceback="", queued_at=db_now())
            tx.move("job", row.model, row.state, QUEUED)
            tx.event(EventKind.RETRIED, job_id=job_id, state=QUEUED, actor=operator or tx.actor,
                     reason=f"was {row.state}")
            _settle_series(tx, job_series_uids(tx, job_id))
            return True


def _await_delivery(tx, job_id: str, results: dict[str, str], destinations: Sequence[str]) -> None:
    """A job's results wait in the outbox for each destination: one pending delivery each, due now
    (replacing those of an earlier run of the job)."""
    for old in tx.conn.execute(select(deliveries.c.destination, deliveries.c.state).where(deliveries.c.job_id == job_id)):
        tx.move("delivery", old.destination, old.state, None)
    tx.conn.execute(deliveries.delete().where(deliveries.c.job_id == job_id))
    for name in destinations:
        tx.conn.execute(insert(deliveries).values(job_id=job_id, destination=name, state=PENDING,
                                                  next_attempt_at=db_now()))
        tx.move("delivery", name, None, PENDING)
    tx.conn.execute(insert(delivery_instances), [
        {"job_id": job_id, "destination": name, "file_name": file, "sop_instance_uid": uid, "state": PENDING}
        for name in destinations for file, uid in results.items()])
