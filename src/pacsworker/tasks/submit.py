"""From a complete series to queued jobs; and the recovery sweep for lost workers and deliveries."""

from __future__ import annotations

import logging
import time

from ..config import Settings
from ..records import DataLayout, JobRecord, JobState, SeriesRecord, SeriesState, write_json_atomic
from ..scp.routing import route
from .app import DELIVERY_QUEUE, model_queue
from .ledger import save_job

log = logging.getLogger("pacsworker.tasks")


def submit_series(settings: Settings, record: SeriesRecord) -> None:
    """Route a complete series: queue one job per matching model, or record why it was skipped.

    Raises whatever the broker raises; the caller keeps the series pending and tries again.
    """
    from .jobs import process_series

    layout = DataLayout(settings.data_dir)
    models, reason = route(record, settings.models)
    if not models:
        record.state, record.reason = SeriesState.SKIPPED, reason
        log.info("series %s (%s, %d instances) skipped: %s", record.series_uid, record.modality, record.instances, reason)
        return
    for name in models:
        job = JobRecord(
            job_id=f"{name}_{record.series_uid}_{int(time.time() * 1000)}",
            series_uid=record.series_uid,
            study_uid=record.study_uid,
            model=name,
            spool_dir=str(layout.series_dir(record.series_uid)),
        )
        save_job(layout, job)
        process_series.apply_async((job.job_id,), queue=model_queue(name), task_id=job.job_id)
        record.jobs.append(job.job_id)
        log.info("series %s (%d instances) queued for %s as job %s", record.series_uid, record.instances, name, job.job_id)
    record.state, record.reason = SeriesState.QUEUED, ""


def recover(settings: Settings, now: float | None = None) -> int:
    """Re-queue jobs whose worker stopped beating and deliveries nobody is retrying; returns the count."""
    from .jobs import deliver, process_series

    layout = DataLayout(settings.data_dir)
    now = time.time() if now is None else now
    stale = settings.queue.stale_after_seconds
    count = 0
    for job in layout.iter_records(layout.jobs, JobRecord):
        if job.state == JobState.RUNNING and now - job.heartbeat > stale:
            log.warning("job %s: worker %s silent for %.0f s; re-queued", job.job_id, job.worker, now - job.heartbeat)
            job.state = JobState.QUEUED
            save_job(layout, job)
            process_series.apply_async((job.job_id,), queue=model_queue(job.model))
            count += 1
    for delivery in layout.iter_deliveries():
        if not delivery.complete and delivery.next_attempt_at and now - delivery.next_attempt_at > stale:
            log.warning("job %s: undelivered results found in the outbox; delivery re-queued", delivery.job_id)
            delivery.next_attempt_at = now + stale
            write_json_atomic(layout.delivery_record(delivery.job_id), delivery)
            deliver.apply_async((delivery.job_id,), queue=DELIVERY_QUEUE)
            count += 1
    return count
