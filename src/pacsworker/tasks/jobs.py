"""Task definitions: one model job per series and model, then delivery with retries and backoff."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from .. import metrics
from ..logs import set_correlation
from ..records import (
    DataLayout,
    DeliveryRecord,
    DeliveryState,
    DestinationOutcome,
    JobRecord,
    JobState,
    read_json,
    settle_series_of,
    write_json_atomic,
)
from .app import DELIVERY_QUEUE, app, current_settings
from .ledger import Heartbeat, job_lock, load_job, save_job, worker_identity

log = logging.getLogger("pacsworker.tasks")

FINISHED = {JobState.DELIVERING, JobState.DONE, JobState.FAILED, JobState.NO_RESULT, JobState.IMPLAUSIBLE}


@app.task(name="pacsworker.process_series", bind=True, acks_late=True, reject_on_worker_lost=True)
def process_series(self, job_id: str) -> str:
    """Run the job's model over its spooled series; write the results to the outbox."""
    set_correlation(job_id)
    settings = current_settings()
    layout = DataLayout(settings.data_dir)
    with job_lock(layout, job_id):
        claimed = _claim(settings, layout, job_id)
    if isinstance(claimed, str):
        return claimed
    job = claimed
    log.info("job %s started, attempt %d", job_id, job.attempts)  # the id names the model and the series

    from ..scp.spool import series_files
    from ..worker.adapters import ModelLoadError
    from ..worker.outputs import ModelOutputError, ModelRunError
    from ..worker.runtime import run_model, run_study_model
    from ..worker.volume import NotAVolumeError, UndecodablePixelData

    outcome = None
    try:
        with Heartbeat(layout.job_record(job_id), settings.queue.heartbeat_seconds, job.worker) as heartbeat:
            spool = Path(job.spool_dir)
            if not spool.is_dir():
                raise FileNotFoundError(
                    f"spool folder {spool} is not visible from this worker: data_dir must be shared storage"
                )
            if job.series_uids:  # a study job: every series of the study its model wanted
                files = [series_files(layout.series_dir(uid)) for uid in job.series_uids]
                outcome = run_study_model(files, settings.model(job.model), earlier_report(layout, job),
                                          on_stage=heartbeat.set_stage)
            else:
                outcome = run_model(series_files(spool), settings.model(job.model), earlier_report(layout, job),
                                    on_stage=heartbeat.set_stage)
    except NotAVolumeError as exc:
        job.state, job.reason = JobState.NO_RESULT, str(exc)
    except UndecodablePixelData as exc:
        job.state, job.reason = JobState.FAILED, str(exc)
    except SoftTimeLimitExceeded:
        job.state, job.reason = JobState.FAILED, f"exceeded the soft time limit of {settings.queue.job_soft_time_limit} s"
    except (ModelLoadError, ModelOutputError, ModelRunError) as exc:
        job.state, job.reason = JobState.FAILED, str(exc)
        job.traceback = getattr(exc, "traceback", "")  # what the model's own code raised, where
        app_log = getattr(exc, "log", "")
        if app_log:  # a MONAI Deploy application that failed: its whole log
            job.reason += f"\n(full log: {_keep_app_log(layout, job_id, app_log)})"
    except Exception as exc:  # noqa: BLE001 - the job fails with its reason, the worker keeps serving
        job.state, job.reason = JobState.FAILED, f"{type(exc).__name__}: {exc}"
        job.traceback = traceback.format_exc().rstrip("\n")
    with job_lock(layout, job_id):  # no other worker claims or finishes this job meanwhile
        on_disk = read_json(layout.job_record(job_id), JobRecord)
        if on_disk is not None and (on_disk.worker, on_disk.attempts) != (job.worker, job.attempts):
            log.warning("job %s: attempt %d was taken over by %s (attempt %d) while it ran; its results are dropped",
                        job_id, job.attempts, on_disk.worker, on_disk.attempts)
            return "superseded"
        if on_disk is not None:
            job.heartbeat = on_disk.heartbeat  # the heartbeat thread's last write
        if outcome is not None:
            job.timings.update(outcome.timings)
            job.values = outcome.values
            job.implausible = list(outcome.implausible)
            if outcome.app_log:
                _keep_app_log(layout, job_id, outcome.app_log)
            if outcome.withheld:
                job.state, job.reason = JobState.IMPLAUSIBLE, outcome.reason
                log.warning("job %s: results withheld: %s", job_id, outcome.reason)
            elif not outcome.has_results:
                job.state, job.reason = JobState.NO_RESULT, outcome.reason
            elif outcome.problems:
                _quarantine(layout, job, outcome)
            else:
                _write_outbox(layout, job, outcome, settings)
                if outcome.notes:  # processed as configured, but the operator should know
                    job.notes = list(outcome.notes)
                    log.warning("job %s: series processed as configured despite: %s", job_id, "; ".join(job.notes))
        job.finished_at = time.time()
        job.stage = ""
        save_job(layout, job)
    _count_job(job)
    settle_series_of(layout, *job.series_uids or [job.series_uid])
    if job.state == JobState.FAILED:  # with the model's traceback when it raised: the record keeps it too
        log.error("job %s failed: %s%s", job_id, job.reason, f"\n{job.traceback}" if job.traceback else "")
    else:
        log.info("job %s %s%s", job_id, job.state.value, f": {job.reason}" if job.reason else "")
    if job.state == JobState.DELIVERING:
        deliver.apply_async((job_id,), queue=DELIVERY_QUEUE)
    return job.state.value


def _claim(settings, layout: DataLayout, job_id: str) -> JobRecord | str:
    """Take the job for this worker (under its lock), or say why not (its state, as the task's result)."""
    job = load_job(layout, job_id)
    if job.state in FINISHED:
        log.info("job %s already %s; message ignored", job_id, job.state.value)
        return job.state.value
    if job.state == JobState.RUNNING and time.time() - job.heartbeat < settings.queue.stale_after_seconds:
        log.info("job %s is running on %s; duplicate message ignored", job_id, job.worker)
        return job.state.value
    if job.attempts >= settings.queue.max_attempts:
        job.state, job.reason = JobState.FAILED, f"gave up after {job.attempts} attempts (worker lost each time)"
        save_job(layout, job)
        settle_series_of(layout, *job.series_uids or [job.series_uid])
        log.error("job %s failed: %s", job_id, job.reason)
        return job.state.value
    job.attempts += 1
    job.traceback = ""  # an earlier attempt's
    job.state, job.worker, job.heartbeat, job.started_at = JobState.RUNNING, worker_identity(), time.time(), time.time()
    save_job(layout, job)
    return job


def _count_job(job: JobRecord) -> None:
    """The job's end and its stages, in the worker's metrics."""
    metrics.JOBS_FINISHED.labels(job.model, "results" if job.state == JobState.DELIVERING else job.state.value).inc()
    if job.started_at and job.queued_at:
        metrics.observe_stage("queued", job.started_at - job.queued_at)
    timings = job.timings
    for stage, keys in (("load", ("load_s",)), ("model", ("model_s",)), ("encode", ("encode_s", "validate_s"))):
        if any(key in timings for key in keys):
            metrics.observe_stage(stage, sum(timings.get(key, 0.0) for key in keys))


def earlier_report(layout: DataLayout, job: JobRecord) -> dict:
    """The SRs (by role: sr, image_sr) of the latest earlier job of the same model on the same
    series that wrote one, each the predecessor of the new one of its role."""
    from ..encoders.results import EarlierReport

    found = {}
    finished = [
        other for other in layout.iter_records(layout.jobs, JobRecord)
        if other.model == job.model and other.job_id != job.job_id
        and (other.study_uid == job.study_uid and bool(other.series_uids) if job.series_uids
             else other.series_uid == job.series_uid)
        and other.state in (JobState.DELIVERING, JobState.DONE)
    ]
    for role in ("sr", "image_sr"):
        earlier = [other for other in finished if role in other.outputs and f"{role}_series" in other.outputs]
        if earlier:
            latest = max(earlier, key=lambda other: other.finished_at)
            found[role] = EarlierReport(latest.study_uid, latest.outputs[f"{role}_series"], latest.outputs[role])
    return found


def _keep_app_log(layout: DataLayout, job_id: str, text: str) -> Path:
    """A MONAI Deploy application's log, beside the job's record: ``jobs/<job_id>.app.log``."""
    path = layout.jobs / f"{job_id}.app.log"
    path.write_text(text)
    return path


def _keep_app_files(folder: Path, outcome) -> None:
    """Files a model wrote besides DICOM objects, under ``app-files/``: kept with the job, never sent."""
    root = (folder / "app-files").resolve()
    for name, data in outcome.app_files.items():
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            log.warning("model output %r points outside its folder; not kept", name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _quarantine(layout: DataLayout, job: JobRecord, outcome) -> None:
    """Results that failed the validation gate: kept for inspection with the reason, never sent."""
    folder = layout.quarantine / job.job_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, ds in outcome.result_objects().items():
        ds.save_as(folder / name, enforce_file_format=True)
    _keep_app_files(folder, outcome)
    (folder / "reason.txt").write_text("\n".join(outcome.problems) + "\n")
    job.state = JobState.FAILED
    job.reason = f"results failed validation (kept in {folder}): " + "; ".join(outcome.problems[:3])
    log.error("job %s: results quarantined: %s", job.job_id, "; ".join(outcome.problems[:3]))


def _write_outbox(layout: DataLayout, job: JobRecord, outcome, settings) -> None:
    folder = layout.job_outbox(job.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    files, uids = [], {}
    # ours: seg.dcm and sr.dcm (the SR alone for scores, classes and boxes); or a model's own objects
    for name, ds in outcome.result_objects().items():
        final = folder / name
        tmp = folder / f".tmp-{name}"
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(final)
        files.append(final.name)
        uids[final.name] = str(ds.SOPInstanceUID)
        role = final.stem  # seg, sr, or e.g. app-seg-1
        job.outputs[role] = str(ds.SOPInstanceUID)
        job.outputs[f"{role}_series"] = str(ds.SeriesInstanceUID)
    from ..worker.runtime import write_values

    write_values(outcome, folder)  # sidecars for the operator; only the .dcm files are delivered
    _keep_app_files(folder, outcome)
    delivery = DeliveryRecord(
        job_id=job.job_id,
        files=files,
        sop_instance_uids=uids,
        destinations={d.name: DestinationOutcome() for d in settings.effective_destinations(job.model)},
        next_attempt_at=time.time(),  # the recovery sweep sends it if the deliver message is lost
    )
    write_json_atomic(layout.delivery_record(job.job_id), delivery)
    job.state, job.reason = JobState.DELIVERING, ""


@app.task(name="pacsworker.deliver", bind=True, acks_late=True, reject_on_worker_lost=True)
def deliver(self, job_id: str) -> str:
    """Send a job's results to each destination that is due; come back when the next one is due.

    The bookkeeping (per destination and instance, backoff, dead letters) is in
    :mod:`pacsworker.destinations.outbox`; here: the job's state and the next message.
    """
    set_correlation(job_id)
    from ..destinations.outbox import OutboxBusy, Superseded, attempt_delivery

    settings = current_settings()
    layout = DataLayout(settings.data_dir)
    try:
        record = attempt_delivery(settings, layout, job_id, task_id=self.request.id or "")
    except Superseded:
        log.info("delivery %s: a newer deliver message is in charge; this one is dropped", job_id)
        return "superseded"
    except OutboxBusy:  # another message, the sweep or the operator has it this moment: come back
        raise self.retry(countdown=settings.delivery.backoff_base_seconds, max_retries=None) from None
    if record is None:
        log.error("delivery %s: no outbox record; nothing to send", job_id)
        return "missing"
    if record.pending:
        raise self.retry(countdown=max(0.0, record.next_attempt_at - time.time()), max_retries=None)
    settle_delivered_job(layout, record)
    return "delivered" if record.complete else DeliveryState.DEAD_LETTER.value


def settle_delivered_job(layout: DataLayout, record: DeliveryRecord) -> None:
    """A job whose delivery settled: done when every destination has it, else failed with the dead letters' reasons."""
    job = read_json(layout.job_record(record.job_id), JobRecord)
    if job is None:
        return
    if record.complete:
        job.state, job.reason, job.timings["delivered_at"] = JobState.DONE, "", time.time()
    elif record.dead_lettered:
        reasons = "; ".join(f"{name}: {o.last_error}" for name, o in record.destinations.items()
                            if o.state == DeliveryState.DEAD_LETTER)
        job.state = JobState.FAILED
        job.reason = f"delivery dead-lettered (`pacsworker deliveries retry {record.job_id}`): {reasons}"
    else:
        job.state, job.reason = JobState.DELIVERING, ""
    save_job(layout, job)
    settle_series_of(layout, *job.series_uids or [job.series_uid])
