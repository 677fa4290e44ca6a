"""From a complete series to queued jobs; and the recovery sweep for unsent jobs, lost workers and deliveries.

Routing is idempotent: a job is made in the ledger once per series content and model (its id names
both), before anything is sent; the broker is then offered the job with a short timeout. A job
the broker did not take (or whose message it lost) stays queued in the ledger and the recovery
sweep sends it again, so neither a broker outage nor a receiver restart loses or duplicates a job.
"""

from __future__ import annotations

import hashlib
import logging

from .. import metrics
from ..config import ModelSettings, Settings
from ..ledger import Ledger, NewJob, SeriesFacts, Study, open_ledger
from ..ledger.rows import FACT_KEYS
from ..records import DataLayout, JobState, SeriesRecord
from ..scp.routing import route
from ..scp.spool import series_files
from ..worker.model_files import job_fingerprint
from .queues import DELIVERY_QUEUE, model_queue

log = logging.getLogger("pacsworker.tasks")


def job_id_for(model: ModelSettings, record: SeriesRecord) -> str:
    """The same series content and the same model (version, settings and files) always name the same job."""
    return f"{model.name}_{record.series_uid}_{record.content_digest or 'all'}_{job_fingerprint(model)}"


def submit_series(settings: Settings, record: SeriesRecord) -> None:
    """Route a complete series: one job per matching model (kept if it exists), made for exactly
    the instances the series was completed with, then send.

    A resend of the same instances finds its job and makes no new one; a job that failed is run
    again. Never blocks on the broker for longer than ``queue.publish_timeout_seconds``.
    """
    ledger = open_ledger(settings, "scp")
    layout = DataLayout(settings.data_dir)
    configured: list[ModelSettings] = list(settings.models)  # (route takes a list of the base class)
    models, reason = route(record, configured)
    if not models:
        if not _routed(ledger, record, lambda: ledger.skip_series(record.series_uid, reason)):
            return
        log.info("series %s (%s, %d instances) skipped: %s", record.series_uid, record.modality, record.instances, reason)
        metrics.SERIES_ROUTED.labels("skipped", metrics.skip_reason_kind(reason)).inc()
        return
    record.study_models = study_models = [name for name in models if settings.model(name).scope == "study"]
    sop_uids = record.sop_instance_uids or [p.stem for p in series_files(layout.series_dir(record.series_uid))]
    new_jobs = [
        NewJob(job_id_for(settings.model(name), record), record.series_uid, record.study_uid, name,
               inputs={record.series_uid: list(sop_uids)}, spool_dir=str(layout.series_dir(record.series_uid)))
        for name in models if name not in study_models
    ]
    to_send: list[str] = []
    before = {job.job_id: ledger.job(job.job_id) for job in new_jobs}  # by key: what stood before this routing
    if not _routed(ledger, record, lambda: _route(ledger, record, new_jobs, study_models, to_send)):
        return
    for job in new_jobs:
        earlier = before[job.job_id]
        if job.job_id in to_send and earlier is not None and earlier.state == JobState.FAILED.value:
            log.info("series %s received again after job %s failed; the job runs again", record.series_uid,
                     job.job_id)
        elif job.job_id in to_send:
            log.info("series %s (%d instances) queued for %s as job %s", record.series_uid, record.instances,
                     job.model, job.job_id)
        else:
            now = ledger.job(job.job_id)
            log.info("series %s received again with the same instances; job %s (%s) stands", record.series_uid,
                     job.job_id, now.state if now is not None else "gone")
    if study_models:
        log.info("series %s held for study %s for %s", record.series_uid, record.study_uid, ", ".join(study_models))
    metrics.SERIES_ROUTED.labels("queued" if len(study_models) < len(models) else "study", "").inc()
    by_id = {job.job_id: job.model for job in new_jobs}
    for job_id in to_send:
        if not send_job(settings, job_id, by_id[job_id], ledger):
            break  # the broker is down: the sweep sends the rest


def _route(ledger: Ledger, record: SeriesRecord, new_jobs: list[NewJob], study_models: list[str],
           to_send: list[str]) -> bool:
    sent = ledger.route_series(record.series_uid, new_jobs, study_models)
    if sent is None:
        return False
    to_send.extend(sent)
    return True


def _routed(ledger: Ledger, record: SeriesRecord, transition) -> bool:
    """Run a routing transition; a series the ledger does not hold as receiving (a record made by
    hand, or one whose opening was not recorded) is recorded complete first. False: another
    receiver routed it meanwhile."""
    if transition():
        return True
    known = ledger.series(record.series_uid)
    if known is not None and known.state == "receiving":
        return False
    if known is not None:
        log.info("series %s was routed meanwhile (it is %s); nothing to do", record.series_uid, known.state)
        return False
    facts = SeriesFacts(record.series_uid, record.study_uid, modality=record.modality[:16],
                        sop_class_uid=record.sop_class_uid, calling_aet=record.calling_aet[:16],
                        facts={key: getattr(record, key) for key in FACT_KEYS})
    ledger.record_instance(facts, instances=record.instances or len(record.sop_instance_uids) or None)
    ledger.complete_series(record.series_uid, instances=record.instances, frames=record.frames,
                           content_digest=record.content_digest, completed_by=record.completed_by or "on request",
                           contiguous=record.contiguous, contiguity=record.contiguity)
    return bool(transition())


def study_job_id(model: ModelSettings, study_uid: str, members: dict[str, str]) -> str:
    """The same series (by content) of a study given to the same model always name the same study job.

    ``members``: the series the model is given (Series Instance UID -> content digest); a series
    only another model wants does not change this model's job.
    """
    content = "\n".join(f"{uid}={digest}" for uid, digest in sorted(members.items()))
    return f"{model.name}_study_{study_uid}_{hashlib.sha256(content.encode()).hexdigest()[:16]}_{job_fingerprint(model)}"


def complete_studies(settings: Settings, receiving: set[str]) -> int:
    """Make the study jobs of every study that is quiet and has no series still receiving.

    ``receiving``: Study Instance UIDs this receiver still collects a series of (series receiving at
    another receiver are known to the ledger). A study's jobs are made in one transition, so
    receivers sharing a ledger make them once. Returns how many study jobs were made (or run again).
    """
    ledger = open_ledger(settings, "scp")
    made = 0
    for study in ledger.studies_due(settings.scp.study_quiet_seconds):
        if study.study_uid not in receiving:
            made += _make_study_jobs(settings, ledger, study)
    return made


def _make_study_jobs(settings: Settings, ledger: Ledger, study: Study) -> int:
    layout = DataLayout(settings.data_dir)
    new_jobs, gone = [], []
    for name in study.models:
        try:
            model = settings.model(name)
        except KeyError:
            gone.append(name)
            continue
        members = {}
        for uid in sorted(study.members):
            member = ledger.series(uid)
            if member is not None and name in member.study_models:
                members[uid] = study.members[uid]
        if not members:
            continue
        first = next(iter(members))
        new_jobs.append(NewJob(
            study_job_id(model, study.study_uid, members), first, study.study_uid, name,
            inputs={uid: [p.stem for p in series_files(layout.series_dir(uid))] for uid in members},
            spool_dir=str(layout.series_dir(first)), scope="study"))
    if gone:
        log.warning("study %s: model(s) %s no longer configured; not run", study.study_uid, ", ".join(gone))
    kept = [name for name in study.models if name not in gone]
    to_send = ledger.route_study(study.study_uid, new_jobs, kept if gone else None)
    if to_send is None:
        return 0  # another receiver made them meanwhile
    for job in new_jobs:
        if job.job_id in to_send:
            log.info("study %s quiet with %d series: queued for %s as job %s", study.study_uid, len(job.inputs),
                     job.model, job.job_id)
            send_job(settings, job.job_id, job.model, ledger)  # when the broker is down, the recovery sweep sends it
    return len(to_send)


def send_job(settings: Settings, job_id: str, model: str, ledger: Ledger | None = None) -> bool:
    """Offer a job to the broker once, with a short timeout; then record that it was taken.

    A job the broker refused (or whose message it lost) is sent again by the recovery sweep: it
    stays queued, and the ledger knows when it was last sent.
    """
    from .jobs import process_series

    ledger = ledger if ledger is not None else open_ledger(settings, "scp")
    try:
        process_series.apply_async((job_id,), queue=model_queue(model), task_id=job_id, retry=False)
    except Exception as exc:  # noqa: BLE001 - any broker error: the job waits in the ledger for the sweep
        ledger.mark_unsent(job_id)
        log.warning("job %s not sent, the broker is unavailable (%s: %s); the recovery sweep will send it",
                    job_id, type(exc).__name__, exc)
        return False
    ledger.mark_sent(job_id)
    return True


def recover(settings: Settings) -> int:
    """Re-queue jobs whose worker stopped beating, send jobs queued but not started within
    ``queue.stale_after_seconds`` (whatever the broker said), re-send overdue deliveries.

    Costs O(work due), never O(history). Returns how many messages were sent.
    """
    ledger = open_ledger(settings, "scp")
    stale = settings.queue.stale_after_seconds
    for job_id in ledger.requeue_stale(stale):
        log.warning("job %s: its worker was silent for more than %.0f s; re-queued", job_id, stale)
    count = 0
    for job in ledger.jobs_to_send(stale):
        if not send_job(settings, job.job_id, job.model, ledger):
            return count
        log.info("job %s sent by the recovery sweep", job.job_id)
        count += 1
    for job_id in ledger.deliveries_overdue(stale):
        sent = _resend_delivery(ledger, job_id, stale)
        if sent is None:
            return count
        count += sent
    return count


def _resend_delivery(ledger: Ledger, job_id: str, stale: float) -> int | None:
    """Send a deliver message for an overdue delivery; 1 if sent, 0 if not needed, None if the broker is down.

    The new message is put in charge first, so that the lost one, should it turn up, is dropped; if
    the broker refuses it, the next sweep after ``stale`` seconds tries again.
    """
    from .jobs import deliver

    task_id = ledger.hand_over(job_id, stale)
    if task_id is None:
        return 0
    try:
        deliver.apply_async((job_id,), queue=DELIVERY_QUEUE, task_id=task_id, retry=False)
    except Exception as exc:  # noqa: BLE001
        log.warning("delivery of job %s not re-sent, the broker is unavailable (%s)", job_id, exc)
        return None
    log.warning("job %s: undelivered results found in the outbox; delivery re-queued", job_id)
    return 1
