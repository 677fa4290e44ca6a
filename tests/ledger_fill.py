"""Filling a ledger through its transitions, as the receiver and the workers do, for the tests of what
operators read (status, the page, /metrics, history, jobs show, cleanup)."""

from __future__ import annotations

from sqlalchemy import update

from pacsworker.ledger import Ledger, NewJob, SeriesFacts
from pacsworker.ledger.schema import deliveries, events, jobs, series


def received(ledger: Ledger, series_uid: str, study_uid: str, instances: int = 3, calling_aet: str = "MODALITY",
             modality: str = "CT") -> list[str]:
    """A series received and judged complete (still receiving until routed); returns its SOP Instance UIDs."""
    facts = SeriesFacts(series_uid, study_uid, modality=modality, calling_aet=calling_aet)
    for _ in range(instances):
        ledger.record_instance(facts)
    assert ledger.complete_series(series_uid, instances=instances, frames=instances, content_digest="d",
                                  completed_by="quiet for 5 s")
    return [f"{series_uid}.{n}" for n in range(1, instances + 1)]


def routed(ledger: Ledger, series_uid: str, study_uid: str, models: list[str], instances: int = 3,
           calling_aet: str = "MODALITY") -> list[str]:
    """A series received and routed to one job per model (ids ``<model>_<series>_d``); returns the job ids."""
    sops = received(ledger, series_uid, study_uid, instances, calling_aet)
    new = [NewJob(f"{model}_{series_uid}_d", series_uid, study_uid, model, {series_uid: sops}) for model in models]
    assert ledger.route_series(series_uid, new) is not None
    return [job.job_id for job in new]


def run(ledger: Ledger, job_id: str, state: str, *, reason: str = "", values: dict | None = None,
        results: dict[str, str] | None = None, destinations: list[str] | None = None,
        implausible: list[str] | None = None, worker: str = "gpu1:42") -> None:
    """A job sent, claimed and finished in ``state`` (delivering: its ``results`` wait for ``destinations``)."""
    assert ledger.mark_sent(job_id)
    claim = ledger.claim_job(job_id, worker, max_attempts=3, stale_after=600)
    assert claim.won
    assert ledger.finish_job(job_id, worker, claim.job.attempts, state, reason=reason, values=values,
                             results=results, destinations=destinations or [], implausible=implausible)


def deliver(ledger: Ledger, job_id: str, destination: str, results: dict[str, str]) -> str:
    return ledger.record_attempt(job_id, destination, {file: "" for file in results}, {})


def fail_delivery(ledger: Ledger, job_id: str, destination: str, results: dict[str, str], error: str,
                  permanent: bool = False) -> str:
    return ledger.record_attempt(job_id, destination, {}, {file: error for file in results}, error=error,
                                 permanent=permanent, retry_in=60)


def age(ledger: Ledger, seconds: float, *, series_uids: list[str] = (), job_ids: list[str] = (),
        all_events: bool = False) -> None:
    """Move the times of series, jobs (and their deliveries) and events ``seconds`` into the past, as if
    they had happened that long ago (the transitions stamp the database's clock)."""
    with ledger.engine.begin() as conn:
        if series_uids:
            conn.execute(update(series).where(series.c.series_uid.in_(series_uids)).values(
                first_seen=series.c.first_seen - seconds, last_seen=series.c.last_seen - seconds))
        if job_ids:
            conn.execute(update(jobs).where(jobs.c.job_id.in_(job_ids)).values(
                queued_at=jobs.c.queued_at - seconds, sent_at=jobs.c.sent_at - seconds,
                started_at=jobs.c.started_at - seconds, heartbeat=jobs.c.heartbeat - seconds,
                finished_at=jobs.c.finished_at - seconds, timings={}))
            conn.execute(update(deliveries).where(deliveries.c.job_id.in_(job_ids)).values(
                delivered_at=deliveries.c.delivered_at - seconds))
        if all_events:
            conn.execute(update(events).values(at=events.c.at - seconds))
