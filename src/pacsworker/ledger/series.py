"""Transitions of the receiving side: series received, completed and routed; studies held; receivers beating."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import insert, select, update

from ..records import JOB_ENDINGS, JobState, SeriesState
from .core import LedgerCore, Tx, dialect_insert, retried
from .database import db_now
from .rows import NewJob, SeriesFacts
from .schema import EventKind, job_inputs, job_series, jobs, receivers, series, studies

RECEIVING = SeriesState.RECEIVING.value
QUEUED = JobState.QUEUED.value
# a routed series' state follows its current jobs; receiving and skipped ones do not
SETTLED_BY_JOBS = {s.value for s in (SeriesState.QUEUED, SeriesState.DONE, SeriesState.FAILED, SeriesState.NO_RESULT,
                                     SeriesState.IMPLAUSIBLE)}
ENDINGS = {s.value for s in JOB_ENDINGS}


class SeriesTransitions(LedgerCore):
    @retried
    def record_instance(self, facts: SeriesFacts, instances: int | None = None) -> str:
        """An instance of a series is on disk: open the series (new, or again after routing) or count it.

        ``instances``: how many the series holds now when the receiver knows (after a restart it
        counts its spool); None adds one. Returns ``opened``, ``reopened`` or ``added``.
        """
        with self._write() as tx:
            inserted = tx.conn.execute(dialect_insert(tx.conn, series).values(
                series_uid=facts.series_uid, study_uid=facts.study_uid, state=RECEIVING, modality=facts.modality,
                sop_class_uid=facts.sop_class_uid, calling_aet=facts.calling_aet, facts=dict(facts.facts),
                instances=instances or 1, first_seen=db_now(), last_seen=db_now(), study_models=[],
            ).on_conflict_do_nothing(index_elements=["series_uid"]).returning(series.c.series_uid)).first() is not None
            if inserted:
                tx.move("series", "", None, RECEIVING)
                tx.event(EventKind.RECEIVED, series_uid=facts.series_uid, study_uid=facts.study_uid,
                         state=RECEIVING, count=instances or 1)
                return "opened"
            row = tx.locked(series, series_uid=facts.series_uid)
            if row.state == RECEIVING:
                count = instances if instances is not None else series.c.instances + 1
                tx.swap(series, {"series_uid": facts.series_uid}, RECEIVING, instances=count, last_seen=db_now())
                return "added"
            tx.swap(series, {"series_uid": facts.series_uid}, row.state, state=RECEIVING, reason="",
                    instances=instances if instances is not None else row.instances + 1,
                    first_seen=db_now(), last_seen=db_now(), calling_aet=facts.calling_aet or row.calling_aet)
            tx.move("series", "", row.state, RECEIVING)
            tx.event(EventKind.RECEIVED, series_uid=facts.series_uid, study_uid=row.study_uid, state=RECEIVING,
                     count=instances, reason=f"received again after it was {row.state}")
            return "reopened"

    @retried
    def complete_series(self, series_uid: str, *, instances: int, frames: int, content_digest: str,
                        completed_by: str, contiguous: bool | None = None, contiguity: str = "") -> bool:
        """A receiving series is judged complete: record what it holds and why. It stays receiving
        (pending) until :meth:`route_series` or :meth:`skip_series`. False: it was not receiving."""
        with self._write() as tx:
            won = tx.swap(series, {"series_uid": series_uid}, RECEIVING, instances=instances, frames=frames,
                          content_digest=content_digest, completed_by=completed_by, contiguous=contiguous,
                          contiguity=contiguity)
            if won:
                tx.event(EventKind.COMPLETED, series_uid=series_uid, count=instances, reason=completed_by)
            return won

    @retried
    def skip_series(self, series_uid: str, reason: str) -> bool:
        """A complete series no model wants. False: it was not receiving."""
        with self._write() as tx:
            won = tx.swap(series, {"series_uid": series_uid}, RECEIVING, state=SeriesState.SKIPPED.value,
                          reason=reason)
            if won:
                tx.move("series", "", RECEIVING, SeriesState.SKIPPED.value)
                tx.event(EventKind.ROUTED, series_uid=series_uid, state=SeriesState.SKIPPED.value, reason=reason)
            return won

    @retried
    def route_series(self, series_uid: str, new_jobs: Iterable[NewJob],
                     study_models: Iterable[str] = ()) -> list[str] | None:
        """Route a complete series: make each job (an existing one stands; a failed one is queued
        again), make them the series' current jobs, and hold the series for ``study_models``.

        Returns the ids of the jobs to send (made or queued again), or None when the series was
        not receiving (another receiver routed it).
        """
        new_jobs, study_models = list(new_jobs), sorted(set(study_models))
        with self._write() as tx:
            row = tx.locked(series, series_uid=series_uid)
            if row is None or row.state != RECEIVING:
                return None
            to_send = [job.job_id for job in new_jobs if _make_job(tx, job)]
            mine = [job.job_id for job in new_jobs]
            study_jobs = select(jobs.c.job_id).where(jobs.c.scope == "study")
            tx.conn.execute(update(job_series).where(
                job_series.c.series_uid == series_uid, job_series.c.current.is_(True),
                job_series.c.job_id.not_in(mine), job_series.c.job_id.not_in(study_jobs)).values(current=False))
            tx.swap(series, {"series_uid": series_uid}, RECEIVING, state=SeriesState.QUEUED.value, reason="",
                    study_models=study_models)
            tx.move("series", "", RECEIVING, SeriesState.QUEUED.value)
            if study_models:
                _hold_for_study(tx, row, study_models)
            tx.event(EventKind.ROUTED, series_uid=series_uid, study_uid=row.study_uid, state=SeriesState.QUEUED.value,
                     count=len(mine), reason=", ".join([job.model for job in new_jobs] + study_models))
            _settle_series(tx, [series_uid])
            return to_send

    @retried
    def route_study(self, study_uid: str, new_jobs: Iterable[NewJob],
                    models: Iterable[str] | None = None) -> list[str] | None:
        """A waiting study is quiet: make its study jobs; they replace its earlier study jobs as the
        current jobs of its series. ``models``: the study models still configured (None: unchanged).

        Returns the ids of the jobs to send, or None when the study was not waiting.
        """
        new_jobs = list(new_jobs)
        with self._write() as tx:
            study = tx.locked(studies, study_uid=study_uid)
            if study is None or not study.waiting:
                return None
            to_send = [job.job_id for job in new_jobs if _make_job(tx, job)]
            mine = [job.job_id for job in new_jobs]
            members = list(study.members)
            study_jobs = select(jobs.c.job_id).where(jobs.c.scope == "study", jobs.c.study_uid == study_uid)
            tx.conn.execute(update(job_series).where(
                job_series.c.series_uid.in_(members), job_series.c.job_id.in_(study_jobs),
                job_series.c.job_id.not_in(mine)).values(current=False))
            values = {"waiting": False} if models is None else {"waiting": False, "models": sorted(models)}
            tx.conn.execute(update(studies).where(studies.c.study_uid == study_uid).values(**values))
            if models is not None:
                _drop_study_models(tx, members, set(models), sorted(set(study.models) - set(models)))
            _settle_series(tx, members)
            return to_send

    @retried
    def receiver_heartbeat(self, receiver_id: str, *, host: str, pid: int, ae_title: str, ports: dict[str, int],
                           receiving: dict[str, int], short_of_space: bool = False, started: bool = False) -> None:
        """A receiver says it is up (by the database's clock), with the series it is receiving."""
        with self._write() as tx:
            values = dict(host=host, pid=pid, ae_title=ae_title, ports=ports, receiving=receiving,
                          short_of_space=short_of_space, heartbeat=db_now())
            upsert = dialect_insert(tx.conn, receivers).values(receiver_id=receiver_id, started_at=db_now(), **values)
            changed = dict(values, started_at=db_now()) if started else values
            tx.conn.execute(upsert.on_conflict_do_update(index_elements=["receiver_id"], set_=changed))


def _make_job(tx: Tx, job: NewJob) -> bool:
    """Make a job (idempotent by id) as a current job of its series; True: it is to be sent
    (new, or failed before and queued again)."""
    made = tx.conn.execute(dialect_insert(tx.conn, jobs).values(
        job_id=job.job_id, series_uid=job.series_uid, study_uid=job.study_uid, model=job.model, scope=job.scope,
        spool_dir=job.spool_dir, state=QUEUED, queued_at=db_now(), outputs={}, values={}, timings={},
        implausible=[], notes=[],
    ).on_conflict_do_nothing(index_elements=["job_id"]).returning(jobs.c.job_id)).first() is not None
    links = [{"job_id": job.job_id, "series_uid": uid, "current": True} for uid in job.inputs]
    tx.conn.execute(dialect_insert(tx.conn, job_series).values(links).on_conflict_do_update(
        index_elements=["job_id", "series_uid"], set_={"current": True}))
    if made:
        inputs = [{"job_id": job.job_id, "series_uid": uid, "sop_instance_uid": sop}
                  for uid, sops in job.inputs.items() for sop in sops]
        if inputs:
            tx.conn.execute(insert(job_inputs), inputs)
        tx.move("job", job.model, None, QUEUED)
        tx.event(EventKind.QUEUED, job_id=job.job_id, series_uid=job.series_uid, study_uid=job.study_uid,
                 state=QUEUED, count=sum(len(s) for s in job.inputs.values()))
        return True
    row = tx.locked(jobs, job_id=job.job_id)
    if row.state != JobState.FAILED.value:
        return False
    tx.swap(jobs, {"job_id": job.job_id}, row.state, state=QUEUED, attempts=0, sent_at=0, reason="", traceback="",
            stage="", queued_at=db_now())
    tx.move("job", row.model, row.state, QUEUED)
    tx.event(EventKind.QUEUED, job_id=job.job_id, series_uid=job.series_uid, state=QUEUED,
             reason="its series was received again after the job failed")
    return True


def _hold_for_study(tx: Tx, row, models: list[str]) -> None:
    """A complete series that study models want: noted in its study, which waits to be quiet."""
    study = tx.locked(studies, study_uid=row.study_uid)
    if study is None:
        tx.conn.execute(insert(studies).values(study_uid=row.study_uid, members={row.series_uid: row.content_digest},
                                               models=models, last_seen=row.last_seen, waiting=True))
        return
    changed = study.members.get(row.series_uid) != row.content_digest or not set(models) <= set(study.models)
    tx.conn.execute(update(studies).where(studies.c.study_uid == row.study_uid).values(
        members={**study.members, row.series_uid: row.content_digest}, models=sorted(set(study.models) | set(models)),
        last_seen=max(study.last_seen, row.last_seen), waiting=study.waiting or changed))


def _drop_study_models(tx: Tx, members: list[str], kept: set[str], gone: list[str]) -> None:
    """Study models no longer configured: forgotten by the study's series; a series left with no
    current job and no study model is skipped, saying which models went."""
    for series_uid in sorted(members):
        row = tx.locked(series, series_uid=series_uid)
        if row is None:
            continue
        keep = [name for name in row.study_models if name in kept]
        if keep == list(row.study_models):
            continue
        tx.conn.execute(update(series).where(series.c.series_uid == series_uid).values(study_models=keep))
        current = tx.conn.execute(select(job_series.c.job_id).where(
            job_series.c.series_uid == series_uid, job_series.c.current.is_(True)).limit(1)).first()
        if keep or current is not None or row.state not in SETTLED_BY_JOBS:
            continue
        reason = f"model(s) {', '.join(gone)} no longer configured"
        tx.swap(series, {"series_uid": series_uid}, row.state, state=SeriesState.SKIPPED.value, reason=reason)
        tx.move("series", "", row.state, SeriesState.SKIPPED.value)
        tx.event(EventKind.ROUTED, series_uid=series_uid, study_uid=row.study_uid, state=SeriesState.SKIPPED.value,
                 reason=reason)


def _settle_series(tx: Tx, series_uids: Iterable[str]) -> None:
    """Set routed series' states from their current jobs: queued while any runs, else how they ended.

    Any failed job makes the series failed; else any withheld implausible result makes it
    implausible; else any delivered result makes it done; else no-result.
    """
    for series_uid in sorted(set(series_uids)):
        row = tx.locked(series, series_uid=series_uid)
        if row is None or row.state not in SETTLED_BY_JOBS:
            continue
        current = tx.conn.execute(
            select(jobs.c.model, jobs.c.state, jobs.c.reason).join(job_series, job_series.c.job_id == jobs.c.job_id)
            .where(job_series.c.series_uid == series_uid, job_series.c.current.is_(True))).all()
        states = {job.state for job in current}
        reason = ""
        if not states or not states <= ENDINGS:
            state = SeriesState.QUEUED.value
        else:
            state = next(s.value for s in (SeriesState.FAILED, SeriesState.IMPLAUSIBLE, SeriesState.DONE,
                                           SeriesState.NO_RESULT) if s.value in states or s == SeriesState.NO_RESULT)
            reason = "; ".join(f"{job.model}: {job.reason}" for job in current if job.reason)
        if (state, reason) != (row.state, row.reason):
            tx.swap(series, {"series_uid": series_uid}, row.state, state=state, reason=reason)
            tx.move("series", "", row.state, state)
