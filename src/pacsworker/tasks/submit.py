"""From a complete series to queued jobs; and the recovery sweep for unsent jobs, lost workers and deliveries.

Routing is idempotent: a job record is written once per series content and model (its id names
both), before anything is sent; the broker is then offered the job with a short timeout. A job
the broker did not take stays on disk with ``sent_at == 0`` and the recovery sweep sends it later,
so neither a broker outage nor a receiver restart loses or duplicates a job.
"""

from __future__ import annotations

import logging
import time

from ..config import ModelSettings, Settings
from ..records import DataLayout, JobRecord, JobState, SeriesRecord, SeriesState, read_json, write_json_atomic
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
        return
    to_send, routed = [], []
    for name in models:
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
    for job in to_send:
        if not send_job(settings, layout, job):
            break  # the broker is down: the sweep sends the rest


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
    from .jobs import deliver

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
        if not delivery.complete and delivery.next_attempt_at and now - delivery.next_attempt_at > stale:
            try:
                deliver.apply_async((delivery.job_id,), queue=DELIVERY_QUEUE, retry=False)
            except Exception as exc:  # noqa: BLE001
                log.warning("delivery of job %s not re-sent, the broker is unavailable (%s)", delivery.job_id, exc)
                return count
            log.warning("job %s: undelivered results found in the outbox; delivery re-queued", delivery.job_id)
            delivery.next_attempt_at = now + stale
            write_json_atomic(layout.delivery_record(delivery.job_id), delivery)
            count += 1
    return count
