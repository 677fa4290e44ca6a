"""What status, the status page, /metrics and the recovery sweep read: each query by an index, costing
O(what it returns) however long the history."""

from __future__ import annotations

from sqlalchemy import delete, func, literal, or_, select, tuple_

from ..records import JobState, SeriesState
from .core import LedgerCore, retried
from .database import db_now
from .deliveries import DEAD_LETTER, PENDING
from .rows import (
    DeliveredInstance,
    Delivery,
    Event,
    Job,
    Receiver,
    Series,
    Study,
    from_row,
)
from .schema import (
    counters,
    deliveries,
    delivery_instances,
    events,
    job_inputs,
    job_series,
    jobs,
    receivers,
    series,
    studies,
)

RESULT_STATES = (JobState.DELIVERING.value, JobState.DONE.value)


def _all(kind, rows) -> list:
    return [from_row(kind, row) for row in rows]


class LedgerQueries(LedgerCore):
    # --- one record
    def series(self, series_uid: str) -> Series | None:
        with self._read() as conn:
            return from_row(Series, conn.execute(select(series).where(series.c.series_uid == series_uid)).first())

    def job(self, job_id: str) -> Job | None:
        with self._read() as conn:
            return from_row(Job, conn.execute(select(jobs).where(jobs.c.job_id == job_id)).first())

    def job_inputs(self, job_id: str) -> dict[str, list[str]]:
        """The SOP Instance UIDs a job was made for, by series: what its worker loads, and nothing else."""
        with self._read() as conn:
            rows = conn.execute(select(job_inputs.c.series_uid, job_inputs.c.sop_instance_uid)
                                .where(job_inputs.c.job_id == job_id).order_by(job_inputs.c.series_uid)).all()
        found: dict[str, list[str]] = {}
        for row in rows:
            found.setdefault(row.series_uid, []).append(row.sop_instance_uid)
        return found

    def jobs_of_series(self, series_uid: str, current: bool | None = True) -> list[Job]:
        """The jobs of a series' latest routing (``current``), of its earlier content (False), or all (None)."""
        query = select(jobs).join(job_series, job_series.c.job_id == jobs.c.job_id).where(
            job_series.c.series_uid == series_uid)
        if current is not None:
            query = query.where(job_series.c.current.is_(current))
        with self._read() as conn:
            return _all(Job, conn.execute(query.order_by(jobs.c.queued_at)))

    def deliveries_of(self, job_id: str) -> list[Delivery]:
        with self._read() as conn:
            return _all(Delivery, conn.execute(select(deliveries).where(deliveries.c.job_id == job_id)
                                               .order_by(deliveries.c.destination)))

    def delivered_instances(self, job_id: str, destination: str | None = None) -> list[DeliveredInstance]:
        query = select(delivery_instances).where(delivery_instances.c.job_id == job_id)
        if destination is not None:
            query = query.where(delivery_instances.c.destination == destination)
        with self._read() as conn:
            return _all(DeliveredInstance, conn.execute(query.order_by(delivery_instances.c.destination,
                                                                       delivery_instances.c.file_name)))

    def study(self, study_uid: str) -> Study | None:
        with self._read() as conn:
            return from_row(Study, conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first())

    # --- the queue view: counts per state, kept by the transitions themselves
    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{entity: {label: {state: n}}}`` for series ('' label), jobs (by model), deliveries (by destination)."""
        found: dict[str, dict[str, dict[str, int]]] = {"series": {}, "job": {}, "delivery": {}}
        with self._read() as conn:
            for row in conn.execute(select(counters).where(counters.c.n != 0)):
                found.setdefault(row.entity, {}).setdefault(row.label, {})[row.state] = row.n
        return found

    def state_counts(self, entity: str) -> dict[str, int]:
        """Series, jobs or deliveries per state, every label added up."""
        totals: dict[str, int] = {}
        for by_state in self.counts().get(entity, {}).values():
            for state, n in by_state.items():
                totals[state] = totals.get(state, 0) + n
        return totals

    # --- work in progress
    def series_in_state(self, state: SeriesState | str, limit: int = 1000) -> list[Series]:
        with self._read() as conn:
            return _all(Series, conn.execute(select(series).where(series.c.state == SeriesState(state).value)
                                             .order_by(series.c.last_seen).limit(limit)))

    def jobs_in_state(self, state: JobState | str, limit: int = 1000) -> list[Job]:
        """Queued or running jobs (any state; by index on state): oldest first."""
        state = JobState(state).value
        order = jobs.c.heartbeat if state == JobState.RUNNING.value else jobs.c.sent_at
        with self._read() as conn:
            return _all(Job, conn.execute(select(jobs).where(jobs.c.state == state).order_by(order).limit(limit)))

    def deliveries_in_state(self, state: str, limit: int = 1000) -> list[Delivery]:
        """Pending deliveries (next due first) or dead letters (newest first)."""
        order = deliveries.c.dead_lettered_at.desc() if state == DEAD_LETTER else deliveries.c.next_attempt_at
        with self._read() as conn:
            return _all(Delivery, conn.execute(select(deliveries).where(deliveries.c.state == state)
                                               .order_by(order).limit(limit)))

    def dead_letters(self, limit: int = 100) -> list[Delivery]:
        return self.deliveries_in_state(DEAD_LETTER, limit)

    # --- the latest, paged by keyset (pass the last row's (time, id) as ``before``)
    def latest_series(self, limit: int = 20, before: tuple[float, str] | None = None) -> list[Series]:
        query = select(series)
        if before is not None:
            query = query.where(tuple_(series.c.last_seen, series.c.series_uid) < tuple_(*before))
        with self._read() as conn:
            return _all(Series, conn.execute(query.order_by(series.c.last_seen.desc(), series.c.series_uid.desc())
                                             .limit(limit)))

    def latest_jobs(self, limit: int = 20, before: tuple[float, str] | None = None) -> list[Job]:
        query = select(jobs)
        if before is not None:
            query = query.where(tuple_(jobs.c.queued_at, jobs.c.job_id) < tuple_(*before))
        with self._read() as conn:
            return _all(Job, conn.execute(query.order_by(jobs.c.queued_at.desc(), jobs.c.job_id.desc()).limit(limit)))

    # --- recovery: O(work due)
    def jobs_to_send(self, stale_after: float, limit: int = 100) -> list[Job]:
        """Queued jobs never sent, or sent more than ``stale_after`` s ago and still not started
        (whatever the broker said): to be sent (again)."""
        with self._read() as conn:
            return _all(Job, conn.execute(select(jobs).where(jobs.c.state == JobState.QUEUED.value,
                                                             jobs.c.sent_at < db_now() - stale_after)
                                          .order_by(jobs.c.sent_at).limit(limit)))

    def deliveries_overdue(self, stale_after: float, limit: int = 100) -> list[str]:
        """Jobs with a pending delivery overdue by more than ``stale_after`` s (its message was lost)."""
        with self._read() as conn:
            return list(conn.execute(select(deliveries.c.job_id).where(
                deliveries.c.state == PENDING, deliveries.c.next_attempt_at < db_now() - stale_after)
                .order_by(deliveries.c.next_attempt_at).limit(limit)).scalars().unique())

    def studies_due(self, quiet_seconds: float, limit: int = 100) -> list[Study]:
        """Waiting studies quiet for ``quiet_seconds`` with none of their series receiving."""
        with self._read() as conn:
            waiting = _all(Study, conn.execute(select(studies).where(studies.c.waiting.is_(True),
                                                                     studies.c.last_seen < db_now() - quiet_seconds)
                                               .order_by(studies.c.last_seen).limit(limit)))
            members = {uid for study in waiting for uid in study.members}
            receiving = set(conn.execute(select(series.c.series_uid).where(
                series.c.series_uid.in_(members), series.c.state == SeriesState.RECEIVING.value)).scalars())
        return [study for study in waiting if not receiving & set(study.members)]

    # --- the predecessor of a new SR
    def earlier_results(self, job: Job) -> list[Job]:
        """Earlier jobs of the same model on the same series (a study job: the same study) that
        made results, newest first; the caller picks each role's latest SR from their outputs."""
        key = (jobs.c.study_uid == job.study_uid) & (jobs.c.scope == "study") if job.scope == "study" else \
            (jobs.c.series_uid == job.series_uid) & (jobs.c.scope == "series")
        with self._read() as conn:
            return _all(Job, conn.execute(select(jobs).where(key, jobs.c.model == job.model, jobs.c.job_id != job.job_id,
                                                             jobs.c.state.in_(RESULT_STATES))
                                          .order_by(jobs.c.finished_at.desc()).limit(20)))

    # --- receivers and history
    def receivers(self) -> list[tuple[Receiver, float]]:
        """Every receiver, with how many seconds ago (database clock) it last beat."""
        with self._read() as conn:
            rows = conn.execute(select(receivers, (db_now() - receivers.c.heartbeat).label("ago"))
                                .order_by(receivers.c.receiver_id)).all()
        return [(Receiver(**{k: v for k, v in row._mapping.items() if k != "ago"}), float(row.ago)) for row in rows]

    def history(self, *, study_uid: str | None = None, series_uid: str | None = None, job_id: str | None = None,
                since_seconds: float | None = None, limit: int = 200, before_id: int | None = None) -> list[Event]:
        """Events, newest first: of a study, a series (and its jobs), a job, or of the last ``since_seconds``."""
        query = select(events)
        if series_uid is not None:
            of_jobs = select(job_series.c.job_id).where(job_series.c.series_uid == series_uid)
            query = query.where(or_(events.c.series_uid == series_uid, events.c.job_id.in_(of_jobs)))
        if study_uid is not None:
            query = query.where(events.c.study_uid == study_uid)
        if job_id is not None:
            query = query.where(events.c.job_id == job_id)
        if since_seconds is not None:
            query = query.where(events.c.at >= db_now() - since_seconds)
        if before_id is not None:
            query = query.where(events.c.id < before_id)
        with self._read() as conn:
            return _all(Event, conn.execute(query.order_by(events.c.id.desc()).limit(limit)))

    @retried
    def trim_history(self, older_than_seconds: float, batch: int = 10_000) -> int:
        """Remove events older than ``older_than_seconds`` (in batches, oldest first); returns how many."""
        removed = 0
        while True:
            with self._write() as tx:
                oldest = select(events.c.id).where(events.c.at < db_now() - older_than_seconds).order_by(
                    events.c.at).limit(batch)
                n = tx.conn.execute(delete(events).where(events.c.id.in_(oldest))).rowcount
            removed += n
            if n < batch:
                return removed

    @retried
    def recount(self) -> None:
        """Rebuild the state counters from the rows (after an import; O(history), never on a hot path)."""
        with self._write() as tx:
            tx.conn.execute(delete(counters))
            for entity, label, table in (("series", None, series), ("job", jobs.c.model, jobs),
                                         ("delivery", deliveries.c.destination, deliveries)):
                label_column = label if label is not None else literal("")
                for row in tx.conn.execute(select(label_column.label("label"), table.c.state, func.count())
                                           .group_by(label_column, table.c.state)):
                    tx.deltas[(entity, row.label, row.state)] += row[2]
