"""From a complete series to queued jobs; and the recovery sweep for unsent jobs, lost workers and deliveries.

Routing is idempotent: a job record is written once per series content and model (its id names
both), before anything is sent; the broker is then offered the job with a short timeout. A job
the broker did not take stays on disk with ``sent_at == 0`` and the recovery sweep sends it later,
so neither a broker outage nor a receiver restart loses or duplicates a job.
"""

from __future__ import annotations

import hashlib
import logging
import time

from .. import metrics
from ..config import ModelSettings, Settings
from ..records import (
    DataLayout,
    JobRecord,
    JobState,
    SeriesRecord,
    SeriesState,
    StudyRecord,
    read_json,
    series_lock,
    settle_series,
    write_json_atomic,
)
from ..scp.routing import route
from ..worker.model_files import job_fingerprint
from .app import DELIVERY_QUEUE, model_queue
from .ledger import job_lock, save_job

log = logging.getLogger("pacsworker.tasks")


def job_id_for(model: ModelSettings, record: SeriesRecord) -> str:
    """The same series content and the same model (version, settings and files) always name the same job."""
    return f"{model.name}_{record.series_uid}_{record.content_digest or 'all'}_{job_fingerprint(model)}"


def submit_series(settings: Settings, record: SeriesRecord) -> None:
    """Route a complete series: one job record per matching model (kept if it exists), then send.

    A resend of the same instances finds its job and makes no new one; a job that failed is run
    again. Never blocks on the broker for longer than ``queue.publish_timeout_seconds``.
    """
    layout = DataLayout(settings.data_dir)
    configured: list[ModelSettings] = list(settings.models)  # (route takes a list of the base class)
    models, reason = route(record, configured)
    if not models:
        record.state, record.reason = SeriesState.SKIPPED, reason
        log.info("series %s (%s, %d instances) skipped: %s", record.series_uid, record.modality, record.instances, reason)
        metrics.SERIES_ROUTED.labels("skipped", metrics.skip_reason_kind(reason)).inc()
        return
    record.study_models = study_models = [name for name in models if settings.model(name).scope == "study"]
    if study_models:
        hold_for_study(layout, record, study_models)
    to_send, routed = [], [job_id for job_id in record.jobs if job_id in _study_jobs(layout, record)]
    for name in models:
        if name in study_models:
            continue
        job_id = job_id_for(settings.model(name), record)
        job = read_json(layout.job_record(job_id), JobRecord)
        if job is None:
            job = JobRecord(
                job_id=job_id, series_uid=record.series_uid, study_uid=record.study_uid, model=name,
                spool_dir=str(layout.series_dir(record.series_uid)),
            )
            save_job(layout, job)
            log.info("series %s (%d instances) queued for %s as job %s", record.series_uid, record.instances, name, job_id)
            to_send.append(job)
        elif job.state == JobState.FAILED:
            job.state, job.attempts, job.sent_at, job.reason = JobState.QUEUED, 0, 0.0, ""
            save_job(layout, job)
            log.info("series %s received again after job %s failed; the job runs again", record.series_uid, job_id)
            to_send.append(job)
        else:
            log.info("series %s received again with the same instances; job %s (%s) stands",
                     record.series_uid, job_id, job.state.value)
        routed.append(job_id)
    # the series' state follows this routing's jobs; jobs of earlier content stay listed apart
    record.earlier_jobs += [job_id for job_id in record.jobs if job_id not in routed and job_id not in record.earlier_jobs]
    record.jobs = routed
    record.state, record.reason = SeriesState.QUEUED, ""
    metrics.SERIES_ROUTED.labels("queued" if len(study_models) < len(models) else "study", "").inc()
    for job in to_send:
        if not send_job(settings, layout, job):
            break  # the broker is down: the sweep sends the rest


def _study_jobs(layout: DataLayout, record: SeriesRecord) -> list[str]:
    study = read_json(layout.study_record(record.study_uid), StudyRecord)
    return study.jobs if study is not None else []


def hold_for_study(layout: DataLayout, record: SeriesRecord, models: list[str]) -> None:
    """A complete series that study models want: noted in its study, which waits to be quiet."""
    with series_lock(layout, f"study-{record.study_uid}"):
        study = read_json(layout.study_record(record.study_uid), StudyRecord) or StudyRecord(study_uid=record.study_uid)
        if study.series.get(record.series_uid) != record.content_digest or not set(models) <= set(study.models):
            study.waiting = True
        study.series[record.series_uid] = record.content_digest
        study.models = sorted(set(study.models) | set(models))
        study.last_seen = max(study.last_seen, record.last_seen)
        write_json_atomic(layout.study_record(record.study_uid), study)
        if study.waiting:  # what complete_studies looks at: only the studies that wait, not every one kept
            layout.study_record(record.study_uid).with_suffix(".waiting").touch()
    log.info("series %s held for study %s (%d series so far) for %s", record.series_uid, record.study_uid,
             len(study.series), ", ".join(models))


def study_job_id(model: ModelSettings, study_uid: str, members: dict[str, str]) -> str:
    """The same series (by content) of a study given to the same model always name the same study job.

    ``members``: the series the model is given (Series Instance UID -> content digest); a series
    only another model wants does not change this model's job.
    """
    content = "\n".join(f"{uid}={digest}" for uid, digest in sorted(members.items()))
    return f"{model.name}_study_{study_uid}_{hashlib.sha256(content.encode()).hexdigest()[:16]}_{job_fingerprint(model)}"


def complete_studies(settings: Settings, receiving: set[str], now: float | None = None) -> int:
    """Make the study jobs of every study that is quiet and has no series still receiving.

    ``receiving``: Study Instance UIDs this receiver still collects a series of; series records on
    disk in state receiving (another receiver's) count too. Each study is decided under its lock,
    so receivers sharing a data_dir make its jobs once. Returns how many study jobs were made.
    """
    layout = DataLayout(settings.data_dir)
    now = time.time() if now is None else now
    made = 0
    for marker in sorted(layout.studies.glob("*.waiting")):
        study_uid = marker.stem
        if study_uid in receiving:
            continue
        with series_lock(layout, f"study-{study_uid}"):
            current = read_json(layout.study_record(study_uid), StudyRecord)
            if current is None or not current.waiting:
                marker.unlink(missing_ok=True)
                continue
            if now - current.last_seen < settings.scp.study_quiet_seconds:
                continue
            records = {uid: read_json(layout.series_record(uid), SeriesRecord) for uid in current.series}
            if any(r is not None and r.state == SeriesState.RECEIVING for r in records.values()):
                continue  # a series of it is receiving again (here or at another receiver)
            made += _make_study_jobs(settings, layout, current, records)
            marker.unlink(missing_ok=True)
    return made


def _make_study_jobs(settings: Settings, layout: DataLayout, study: StudyRecord,
                     records: dict[str, SeriesRecord | None]) -> int:
    made, jobs, gone = 0, {}, []  # jobs: study job id -> the series it is given
    for name in study.models:
        try:
            model = settings.model(name)
        except KeyError:
            gone.append(name)
            continue
        members = {uid: study.series[uid] for uid in sorted(study.series)
                   if (member := records.get(uid)) is not None and name in member.study_models}
        if not members:
            continue
        job_id = study_job_id(model, study.study_uid, members)
        job = read_json(layout.job_record(job_id), JobRecord)
        if job is None:
            job = JobRecord(
                job_id=job_id, series_uid=next(iter(members)), study_uid=study.study_uid, model=name,
                spool_dir=str(layout.series_dir(next(iter(members)))), series_uids=list(members),
            )
            save_job(layout, job)
            log.info("study %s quiet with %d series: queued for %s as job %s", study.study_uid, len(members), name,
                     job_id)
        elif job.state == JobState.FAILED:
            job.state, job.attempts, job.sent_at, job.reason = JobState.QUEUED, 0, 0.0, ""
            save_job(layout, job)
            log.info("study %s complete again after job %s failed; the job runs again", study.study_uid, job_id)
        else:
            jobs[job_id] = job.series_uids
            continue
        jobs[job_id] = job.series_uids
        made += 1
        send_job(settings, layout, job)  # when the broker is down, the recovery sweep sends it
    if gone:
        log.warning("study %s: model(s) %s no longer configured; not run", study.study_uid, ", ".join(gone))
        study.models = [name for name in study.models if name not in gone]
    earlier = [job_id for job_id in study.jobs if job_id not in jobs]
    study.jobs, study.waiting = list(jobs), False
    write_json_atomic(layout.study_record(study.study_uid), study)
    for uid in study.series:  # each series' state follows its study jobs too
        with series_lock(layout, uid):
            record = read_json(layout.series_record(uid), SeriesRecord)
            if record is None:
                continue
            record.study_models = [name for name in record.study_models if name not in gone]
            record.earlier_jobs += [j for j in earlier if j in record.jobs and j not in record.earlier_jobs]
            mine = [job_id for job_id, members in jobs.items() if uid in members]
            record.jobs = [j for j in record.jobs if j not in earlier and j not in jobs] + mine
            if not record.jobs and not record.study_models:
                record.state, record.reason = SeriesState.SKIPPED, f"model(s) {', '.join(gone)} no longer configured"
                write_json_atomic(layout.series_record(uid), record)
            else:
                write_json_atomic(layout.series_record(uid), settle_series(layout, record))
    return made


def send_job(settings: Settings, layout: DataLayout, job: JobRecord) -> bool:
    """Offer a job to the broker once, with a short timeout; record that it was taken.

    ``sent_at`` is written before the message exists (once it does, a worker owns the record), and
    cleared again when the broker refused it.
    """
    from .jobs import process_series

    job.sent_at = time.time()
    save_job(layout, job)
    try:
        process_series.apply_async(
            (job.job_id,), queue=model_queue(job.model), task_id=job.job_id, retry=False,
        )
    except Exception as exc:  # noqa: BLE001 - any broker error: the job waits on disk for the sweep
        job.sent_at = 0.0
        save_job(layout, job)
        log.warning("job %s not sent, the broker is unavailable (%s: %s); the recovery sweep will send it",
                    job.job_id, type(exc).__name__, exc)
        return False
    return True


_heartbeats_seen: dict[str, tuple[float, float]] = {}  # job id -> (its heartbeat, when this process first saw it)


def _silent_for(job: JobRecord, now: float) -> float:
    """How long this process has seen the job's heartbeat not move, by its own clock.

    Workers on other hosts may run clocks behind or ahead of this one, so the heartbeat's own time
    is not compared with this clock: what counts is that its value stopped changing. After a
    restart, a job is judged only once it has been watched for the stale time.
    """
    beat, seen_at = _heartbeats_seen.get(job.job_id, (None, now))
    if beat != job.heartbeat:
        if len(_heartbeats_seen) > 10000:  # forget jobs long finished
            _heartbeats_seen.clear()
        beat, seen_at = job.heartbeat, now
        _heartbeats_seen[job.job_id] = (beat, seen_at)
    return now - seen_at


def recover(settings: Settings, now: float | None = None) -> int:
    """Send unsent jobs, re-queue jobs whose worker stopped beating, re-send stuck deliveries.

    Returns how many messages were sent.
    """
    layout = DataLayout(settings.data_dir)
    now = time.time() if now is None else now
    stale = settings.queue.stale_after_seconds
    count = 0
    for job in layout.iter_records(layout.jobs, JobRecord):
        if job.state == JobState.QUEUED and not job.sent_at:
            if not send_job(settings, layout, job):
                return count
            log.info("job %s sent by the recovery sweep", job.job_id)
            count += 1
        elif job.state == JobState.RUNNING and _silent_for(job, now) > stale:
            with job_lock(layout, job.job_id):  # a worker may be claiming or finishing it right now
                current = read_json(layout.job_record(job.job_id), JobRecord)
                if current is None or current.state != JobState.RUNNING or current.heartbeat != job.heartbeat:
                    continue
                log.warning("job %s: worker %s silent for %.0f s; re-queued", job.job_id, job.worker,
                            _silent_for(job, now))
                current.state = JobState.QUEUED
                save_job(layout, current)
            _heartbeats_seen.pop(job.job_id, None)
            if not send_job(settings, layout, current):
                return count
            count += 1
    for delivery in layout.iter_deliveries():
        # pending and overdue: its deliver message was lost (dead-lettered ones wait for `deliveries retry`)
        if delivery.pending and delivery.next_attempt_at and now - delivery.next_attempt_at > stale:
            sent = _resend_delivery(layout, delivery.job_id, now, stale)
            if sent is None:
                return count
            count += sent
    return count


def _resend_delivery(layout: DataLayout, job_id: str, now: float, stale: float) -> int | None:
    """Send a deliver message for an overdue delivery; 1 if sent, 0 if not needed, None if the broker is down.

    The new message is put in charge first, so that the lost one, should it turn up, is dropped; if
    the broker refuses it, the next sweep after ``stale`` seconds tries again.
    """
    from ..destinations.outbox import hand_over
    from .jobs import deliver

    task_id = hand_over(layout, job_id, now, stale)
    if task_id is None:
        return 0
    try:
        deliver.apply_async((job_id,), queue=DELIVERY_QUEUE, task_id=task_id, retry=False)
    except Exception as exc:  # noqa: BLE001
        log.warning("delivery of job %s not re-sent, the broker is unavailable (%s)", job_id, exc)
        return None
    log.warning("job %s: undelivered results found in the outbox; delivery re-queued", job_id)
    return 1
