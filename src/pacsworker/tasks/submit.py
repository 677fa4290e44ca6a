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
    DataLayout, JobRecord, JobState, SeriesRecord, SeriesState, StudyRecord, read_json, series_lock,
    settle_series, write_json_atomic,
)
from ..scp.routing import route
from .app import DELIVERY_QUEUE, model_queue
from .ledger import save_job

log = logging.getLogger("pacsworker.tasks")


def job_id_for(model: ModelSettings, record: SeriesRecord) -> str:
    """The same series content and the same model (version and settings) always name the same job."""
    return f"{model.name}_{record.series_uid}_{record.content_digest or 'all'}_{model.fingerprint()}"


def submit_series(settings: Settings, record: SeriesRecord) -> None:
    """Route a complete series: one job record per matching model (kept if it exists), then send.

    A resend of the same instances finds its job and makes no new one; a job that failed is run
    again. Never blocks on the broker for longer than ``queue.publish_timeout_seconds``.
    """
    layout = DataLayout(settings.data_dir)
    models, reason = route(record, settings.models)
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
            log.info("series %s received again with the same instances; job %s (%s) stands", record.series_uid, job_id, job.state.value)
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
    log.info("series %s held for study %s (%d series so far) for %s", record.series_uid, record.study_uid,
             len(study.series), ", ".join(models))


def study_job_id(model: ModelSettings, study: StudyRecord) -> str:
    """The same series (by content) of a study and the same model always name the same study job."""
    content = "\n".join(f"{uid}={digest}" for uid, digest in sorted(study.series.items()))
    return f"{model.name}_study_{study.study_uid}_{hashlib.sha256(content.encode()).hexdigest()[:16]}_{model.fingerprint()}"


def complete_studies(settings: Settings, receiving: set[str], now: float | None = None) -> int:
    """Make the study jobs of every study that is quiet and has no series still receiving.

    ``receiving``: the Study Instance UIDs with a series the receiver still collects. Returns how
    many study jobs were made.
    """
    layout = DataLayout(settings.data_dir)
    now = time.time() if now is None else now
    made = 0
    for study in layout.iter_records(layout.studies, StudyRecord):
        if not study.waiting or study.study_uid in receiving or now - study.last_seen < settings.scp.study_quiet_seconds:
            continue
        jobs = []
        for name in study.models:
            try:
                model = settings.model(name)
            except KeyError:
                log.warning("study %s: model %s is no longer configured; not run", study.study_uid, name)
                continue
            job_id = study_job_id(model, study)
            members = [uid for uid in sorted(study.series) if _matches(layout, uid, name)]
            job = read_json(layout.job_record(job_id), JobRecord)
            if job is None and members:
                job = JobRecord(
                    job_id=job_id, series_uid=members[0], study_uid=study.study_uid, model=name,
                    spool_dir=str(layout.series_dir(members[0])), series_uids=members,
                )
                save_job(layout, job)
                log.info("study %s quiet with %d series: queued for %s as job %s", study.study_uid, len(members), name,
                         job_id)
                made += 1
                send_job(settings, layout, job)  # when the broker is down, the recovery sweep sends it
            if job is not None:
                jobs.append(job_id)
        with series_lock(layout, f"study-{study.study_uid}"):
            current = read_json(layout.study_record(study.study_uid), StudyRecord)
            if current is not None and current.series == study.series:
                current.jobs, current.waiting = jobs, False
                write_json_atomic(layout.study_record(study.study_uid), current)
        for uid in study.series:  # each series' state follows its study jobs too
            with series_lock(layout, uid):
                record = read_json(layout.series_record(uid), SeriesRecord)
                if record is None:
                    continue
                record.earlier_jobs += [j for j in record.jobs if "_study_" in j and j not in jobs]
                record.jobs = [j for j in record.jobs if "_study_" not in j] + jobs
                write_json_atomic(layout.series_record(uid), settle_series(layout, record))
    return made


def _matches(layout: DataLayout, series_uid: str, model: str) -> bool:
    """Whether a series of the study was held for this study model (its record says so)."""
    record = read_json(layout.series_record(series_uid), SeriesRecord)
    return record is not None and model in record.study_models


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
        elif job.state == JobState.RUNNING and now - job.heartbeat > stale:
            log.warning("job %s: worker %s silent for %.0f s; re-queued", job.job_id, job.worker, now - job.heartbeat)
            job.state = JobState.QUEUED
            if not send_job(settings, layout, job):
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
