"""The one query layer ``pacsworker status``, the status page, ``/metrics``, ``history`` and ``jobs show``
read: each view is a handful of indexed queries of the ledger, costing what it shows however long the
history (never a read of every record)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from ..records import JobState, SeriesState
from .rows import Delivery, Event, Job, Series, from_row
from .schema import deliveries, delivery_instances

RECENT = 50  # series and jobs the status page lists per page; jobs whose results status shows
LISTED = 1000  # at most this many of one kind of work in progress (receiving, running, failed, ...)
RECEIVER_HEARTBEAT_SECONDS = 5.0  # a receiver beats this often; three missed beats: not running
RESULT_STATES = (JobState.DELIVERING.value, JobState.DONE.value)


def _meaning(term) -> str:
    """A coded term of the values (scheme, value, meaning) as its meaning; a plain value as it is."""
    if isinstance(term, (list, tuple)) and len(term) == 3:
        return str(term[2])
    return "" if term is None else str(term)


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


def value_summary(values: dict) -> str:
    """A job's values in one line: each segment's volume (and mean), scores, classes, box counts."""
    parts = []
    for key, value in values.items():
        if key in ("segments", "measured_segments") and isinstance(value, dict) and all(
                isinstance(v, dict) and "volume_ml" in v for v in value.values()):
            for name, stat in value.items():
                unit = f" {stat['unit']}" if stat.get("unit") else ""
                mean = f", mean {_number(stat['mean'])}{unit}" if "mean" in stat else ""
                parts.append(f"{name} {_number(stat['volume_ml'])} mL{mean}")
            continue
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind == "score":
            parts.append(f"{_meaning(value.get('name')) or key} {_number(value.get('value'))}")
        elif kind == "classification":
            score = f" (score {_number(value['score'])})" if value.get("score") is not None else ""
            meaning = _meaning(value.get("meaning")) or value.get("value")
            parts.append(f"{_meaning(value.get('name')) or key}: {meaning}{score}")
        elif kind == "boxes":
            parts.append(f"{key}: {len(value.get('boxes', []))} box(es)")
        elif kind == "probabilities":
            peaks = ", ".join(f"{name} {p:.2f}" for name, p in value.get("segments", {}).items())
            parts.append(f"{key}: maximum probability {peaks}")
    return "; ".join(parts)


def deliveries_of_jobs(ledger, job_ids: list[str]) -> dict[str, list[Delivery]]:
    """The deliveries of a page of jobs, in one indexed query (by primary key)."""
    if not job_ids:
        return {}
    with ledger._read() as conn:
        rows = conn.execute(select(deliveries).where(deliveries.c.job_id.in_(job_ids))
                            .order_by(deliveries.c.job_id, deliveries.c.destination)).all()
    found: dict[str, list[Delivery]] = {}
    for row in rows:
        delivery = from_row(Delivery, row)
        if delivery is not None:
            found.setdefault(delivery.job_id, []).append(delivery)
    return found


def job_results(ledger, jobs: list[Job], limit: int = RECENT) -> dict[str, dict]:
    """Of ``jobs``, the latest ``limit`` that made results or values: their values and where the results went."""
    made = sorted((j for j in jobs if j.values or j.state in RESULT_STATES), key=lambda j: j.finished_at,
                  reverse=True)[:limit]
    outcomes = deliveries_of_jobs(ledger, [j.job_id for j in made])
    shown = {}
    for job in made:
        found = outcomes.get(job.job_id, [])
        where = [f"{d.destination} ({d.state}{': ' + d.last_error if d.state != 'delivered' and d.last_error else ''})"
                 for d in found]
        shown[job.job_id] = {
            "model": job.model, "state": job.state, "finished_at": job.finished_at, "values": job.values,
            "summary": value_summary(job.values),
            "destinations": {d.destination: {"state": d.state, "attempts": d.attempts, "last_error": d.last_error}
                             for d in found},
            "delivered_to": ", ".join(where),
        }
    return shown


def dead_letter_detail(ledger, letters: list[Delivery]) -> dict[str, dict]:
    """Dead-lettered destinations by job: why, and the instances they lack."""
    shown: dict[str, dict] = {}
    for letter in letters:
        missing = {i.sop_instance_uid or i.file_name: i.detail
                   for i in ledger.delivered_instances(letter.job_id, letter.destination) if i.state != "delivered"}
        shown.setdefault(letter.job_id, {})[letter.destination] = {
            "reason": letter.last_error, "permanent": letter.permanent, "attempts": letter.attempts,
            "dead_lettered_at": letter.dead_lettered_at, "instances": missing,
        }
    return shown


def status_report(ledger, queue_depth: dict[str, int], recent: int = RECENT, listed: int = LISTED) -> dict[str, Any]:
    """What ``pacsworker status --json`` prints: counts from the ledger's counters, work in progress by
    index, the latest ``recent`` series and jobs; ``queue_depth`` comes from the broker."""
    now = ledger.now()
    receivers = ledger.receivers()
    counts = {uid: n for receiver, _ in receivers for uid, n in receiver.receiving.items()}
    receiving = ledger.series_in_state(SeriesState.RECEIVING, listed)
    skipped = ledger.series_in_state(SeriesState.SKIPPED, listed)
    latest_series = ledger.latest_series(recent)
    latest_jobs = ledger.latest_jobs(recent)
    by_state = {state: ledger.jobs_in_state(state, listed)
                for state in (JobState.RUNNING, JobState.FAILED, JobState.NO_RESULT, JobState.IMPLAUSIBLE)}
    pending = ledger.deliveries_in_state("pending", listed)
    pending_by_job: dict[str, dict[str, str]] = {}
    for delivery in pending:
        pending_by_job.setdefault(delivery.job_id, {})[delivery.destination] = delivery.last_error
    return {
        "receivers": {
            f"{r.ae_title}@{r.host}": {
                "state": "up" if ago < 3 * RECEIVER_HEARTBEAT_SECONDS else "not running",
                "ports": r.ports, "pid": r.pid, "last_heartbeat_seconds_ago": round(ago, 1),
                "started_at": r.started_at, "short_of_space": r.short_of_space,
            } for r, ago in receivers
        },
        "series": ledger.state_counts("series"),
        "pending_series": [s.series_uid for s in receiving],
        "receiving": {s.series_uid: {"instances": counts.get(s.series_uid, s.instances), "calling_aet": s.calling_aet,
                                     "modality": s.modality} for s in receiving},
        "queue_depth": queue_depth,
        "running_jobs": {j.job_id: {"model": j.model, "stage": j.stage, "worker": j.worker, "attempt": j.attempts,
                                    "running_seconds": round(now - j.started_at, 1)}
                         for j in by_state[JobState.RUNNING]},
        "series_jobs": {s.series_uid: {"state": s.state, "jobs": [j.job_id for j in ledger.jobs_of_series(s.series_uid)]}
                        for s in latest_series if s.state not in (SeriesState.RECEIVING, SeriesState.SKIPPED)},
        "skipped_series": {s.series_uid: s.reason for s in skipped},
        "jobs": ledger.state_counts("job"),
        "failed_jobs": {j.job_id: j.reason for j in by_state[JobState.FAILED]},
        "no_result_jobs": {j.job_id: j.reason for j in by_state[JobState.NO_RESULT]},
        "results": job_results(ledger, latest_jobs, recent),
        "implausible_jobs": {j.job_id: j.reason for j in by_state[JobState.IMPLAUSIBLE]},
        "flagged_jobs": {j.job_id: "delivered flagged: " + "; ".join(j.implausible)
                         for j in latest_jobs if j.implausible and j.state != JobState.IMPLAUSIBLE.value},
        "pending_deliveries": pending_by_job,
        "dead_letters": dead_letter_detail(ledger, ledger.dead_letters(listed)),
    }


@dataclass(frozen=True)
class Page:
    """One page of the status page: the latest series and jobs before a keyset position, and the
    positions of the next (older) page (None: there is none)."""

    series: list[Series]
    jobs: list[Job]
    results: dict[str, dict]
    undelivered: list[Delivery]
    series_total: int
    jobs_total: int
    older_series: tuple[float, str] | None
    older_jobs: tuple[float, str] | None


def page_view(ledger, limit: int = RECENT, series_before: tuple[float, str] | None = None,
              jobs_before: tuple[float, str] | None = None) -> Page:
    series = ledger.latest_series(limit + 1, before=series_before)
    jobs = ledger.latest_jobs(limit + 1, before=jobs_before)
    older_series = (series[limit - 1].last_seen, series[limit - 1].series_uid) if len(series) > limit else None
    older_jobs = (jobs[limit - 1].queued_at, jobs[limit - 1].job_id) if len(jobs) > limit else None
    series, jobs = series[:limit], jobs[:limit]
    undelivered = ledger.deliveries_in_state("pending", limit) + ledger.dead_letters(limit)
    return Page(series, jobs, job_results(ledger, jobs, limit), undelivered,
                sum(ledger.state_counts("series").values()), sum(ledger.state_counts("job").values()),
                older_series, older_jobs)


@dataclass(frozen=True)
class Gauges:
    """What ``/metrics`` reads at a scrape: counts from the ledger's counters (and the receiving series)."""

    series: dict[str, int]
    receiving_instances: int
    jobs: dict[tuple[str, str], int]
    deliveries: dict[str, int]  # pending, dead-letter: destinations summed


def gauges(ledger) -> Gauges:
    counts = ledger.counts()
    jobs = {(model, state): n for model, by_state in counts.get("job", {}).items() for state, n in by_state.items()}
    deliveries_by_state = {"pending": 0, "dead-letter": 0}
    for by_state in counts.get("delivery", {}).values():
        for state in deliveries_by_state:
            deliveries_by_state[state] += by_state.get(state, 0)
    series_counts: dict[str, int] = {}
    for by_state in counts.get("series", {}).values():
        for state, n in by_state.items():
            series_counts[state] = series_counts.get(state, 0) + n
    receiving = sum(s.instances for s in ledger.series_in_state(SeriesState.RECEIVING, LISTED))
    return Gauges(series_counts, receiving, jobs, deliveries_by_state)


def event_row(event: Event) -> dict[str, Any]:
    return asdict(event)


def job_detail(ledger, job_id: str, events: int = 200) -> dict[str, Any] | None:
    """``pacsworker jobs show``: the job, the instances it was made for, its deliveries (with each
    instance's outcome) and its events, newest first. None: no such job."""
    job = ledger.job(job_id)
    if job is None:
        return None
    inputs = ledger.job_inputs(job_id)
    with ledger._read() as conn:
        instance_rows = conn.execute(select(delivery_instances).where(delivery_instances.c.job_id == job_id)
                                     .order_by(delivery_instances.c.destination, delivery_instances.c.file_name)).all()
    instances: dict[str, dict[str, dict]] = {}
    for row in instance_rows:
        instances.setdefault(row.destination, {})[row.file_name] = {
            "sop_instance_uid": row.sop_instance_uid, "state": row.state, "detail": row.detail,
            "delivered_at": row.delivered_at}
    return {
        "job": asdict(job),
        "inputs": {"count": sum(len(uids) for uids in inputs.values()), "series": inputs},
        "deliveries": [dict(asdict(d), instances=instances.get(d.destination, {})) for d in ledger.deliveries_of(job_id)],
        "events": [event_row(e) for e in ledger.history(job_id=job_id, limit=events)],
    }
