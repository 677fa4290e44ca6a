"""Task definitions: one model job per series and model, then delivery with retries and backoff."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from .. import metrics
from ..ledger import Job, Ledger, open_ledger
from ..logs import set_correlation
from ..records import DataLayout, DeliveryState, JobRecord, JobState
from .app import app, current_settings
from .ledger import Heartbeat, worker_identity
from .queues import DELIVERY_QUEUE

log = logging.getLogger("pacsworker.tasks")

FINISHED = {JobState.DELIVERING, JobState.DONE, JobState.FAILED, JobState.NO_RESULT, JobState.IMPLAUSIBLE}


class MissingInput(FileNotFoundError):
    """An instance a job was made for is not in the spool."""


@app.task(name="pacsworker.process_series", bind=True, acks_late=True, reject_on_worker_lost=True)
def process_series(self, job_id: str) -> str:
    """Run the job's model over exactly the instances it was made for; write the results to the outbox."""
    set_correlation(job_id)
    settings = current_settings()
    layout = DataLayout(settings.data_dir)
    ledger = open_ledger(settings, "worker")
    claimed = _claim(settings, ledger, job_id)
    if isinstance(claimed, str):
        return claimed
    row = claimed
    job = JobRecord(job_id=row.job_id, series_uid=row.series_uid, study_uid=row.study_uid, model=row.model,
                    spool_dir=row.spool_dir, state=JobState.RUNNING, attempts=row.attempts, worker=row.worker,
                    queued_at=row.queued_at, started_at=row.started_at, timings=dict(row.timings))
    log.info("job %s started, attempt %d", job_id, job.attempts)  # the id names the model and the series

    from ..worker.adapters import ModelLoadError
    from ..worker.outputs import ModelOutputError, ModelRunError
    from ..worker.runtime import run_model, run_study_model
    from ..worker.volume import NotAVolumeError, UndecodablePixelData

    outcome, results = None, {}
    try:
        with Heartbeat(ledger, job_id, row.worker, row.attempts, settings.queue.heartbeat_seconds) as heartbeat:
            inputs = input_files(layout, row, ledger.job_inputs(job_id))
            if row.scope == "study":  # a study job: every series of the study its model wanted
                job.series_uids = list(inputs)
                outcome = run_study_model(list(inputs.values()), settings.model(job.model), earlier_report(ledger, row),
                                          on_stage=heartbeat.set_stage)
            else:
                outcome = run_model(inputs[row.series_uid], settings.model(job.model), earlier_report(ledger, row),
                                    on_stage=heartbeat.set_stage)
    except NotAVolumeError as exc:
        job.state, job.reason = JobState.NO_RESULT, str(exc)
    except UndecodablePixelData as exc:
        job.state, job.reason = JobState.FAILED, str(exc)
    except SoftTimeLimitExceeded:
        job.state, job.reason = JobState.FAILED, f"exceeded the soft time limit of {settings.queue.job_soft_time_limit} s"
    except MissingInput as exc:
        job.state, job.reason = JobState.FAILED, str(exc)
    except (ModelLoadError, ModelOutputError, ModelRunError) as exc:
        job.state, job.reason = JobState.FAILED, str(exc)
        job.traceback = getattr(exc, "traceback", "")  # what the model's own code raised, where
        app_log = getattr(exc, "log", "")
        if app_log:  # a MONAI Deploy application that failed: its whole log
            job.reason += f"\n(full log: {_keep_app_log(layout, job_id, app_log)})"
    except Exception as exc:  # noqa: BLE001 - the job fails with its reason, the worker keeps serving
        job.state, job.reason = JobState.FAILED, f"{type(exc).__name__}: {exc}"
        job.traceback = traceback.format_exc().rstrip("\n")
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
            results = _write_outbox(layout, job, outcome)
            if outcome.notes:  # processed as configured, but the operator should know
                job.notes = list(outcome.notes)
                log.warning("job %s: series processed as configured despite: %s", job_id, "; ".join(job.notes))
    destinations = [d.name for d in settings.effective_destinations(job.model)] if results else []
    if not ledger.finish_job(job_id, row.worker, row.attempts, job.state, reason=job.reason, traceback=job.traceback,
                             outputs=job.outputs, values=job.values, timings=job.timings,
                             implausible=job.implausible, notes=job.notes, results=results,
                             destinations=destinations):
        now = ledger.job(job_id)
        log.warning("job %s: attempt %d was taken over (%s) while it ran; its results are dropped", job_id,
                    row.attempts, f"by {now.worker}, attempt {now.attempts}" if now is not None else "gone")
        return "superseded"
    _count_job(job)
    if job.state == JobState.FAILED:  # with the model's traceback when it raised: the ledger keeps it too
        log.error("job %s failed: %s%s", job_id, job.reason, f"\n{job.traceback}" if job.traceback else "")
    else:
        log.info("job %s %s%s", job_id, job.state.value, f": {job.reason}" if job.reason else "")
    if job.state == JobState.DELIVERING:
        deliver.apply_async((job_id,), queue=DELIVERY_QUEUE)
    return job.state.value


def input_files(layout: DataLayout, job: Job, inputs: dict[str, list[str]]) -> dict[str, list[Path]]:
    """The spooled files of exactly the instances a job was made for, by series (files that arrived
    later belong to the next job).

    Raises
    ------
    FileNotFoundError
        When the spool is not visible from this worker (data_dir must be shared storage).
    MissingInput
        Naming the first instance the job was made for whose file is gone.
    """
    if not inputs:  # made before jobs held their inputs: the series as spooled
        from ..scp.spool import series_files

        inputs = {job.series_uid: [p.stem for p in series_files(layout.series_dir(job.series_uid))]}
    found: dict[str, list[Path]] = {}
    for series_uid, sop_uids in inputs.items():
        folder = layout.series_dir(series_uid)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"spool folder {folder} is not visible from this worker: data_dir must be shared storage"
            )
        files = [folder / f"{sop_uid}.dcm" for sop_uid in sop_uids]
        missing = [path for path in files if not path.is_file()]
        if missing:
            raise MissingInput(
                f"instance {missing[0].stem} of series {series_uid} that the job was made for is missing from the "
                f"spool ({missing[0]}){f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; removed "
                "by cleanup or by hand? Send the series again to make a new job")
        found[series_uid] = files
    return found


def _claim(settings, ledger: Ledger, job_id: str) -> Job | str:
    """Take the job for this worker, or say why not (its state, as the task's result)."""
    claim = ledger.claim_job(job_id, worker_identity(), settings.queue.max_attempts,
                             settings.queue.stale_after_seconds)
    if claim.won and claim.job is not None:
        return claim.job
    if claim.state == "missing":
        raise FileNotFoundError(f"job {job_id} is not in the ledger")
    if claim.state == JobState.RUNNING.value:
        log.info("job %s is running on another worker; duplicate message ignored", job_id)
    elif claim.state == JobState.FAILED.value:
        job = ledger.job(job_id)
        log.error("job %s failed: %s", job_id, job.reason if job is not None else "")
    else:
        log.info("job %s already %s; message ignored", job_id, claim.state)
    return claim.state


def _count_job(job: JobRecord) -> None:
    """The job's end and its stages, in the worker's metrics."""
    metrics.JOBS_FINISHED.labels(job.model, "results" if job.state == JobState.DELIVERING else job.state.value).inc()
    if job.started_at and job.queued_at:
        metrics.observe_stage("queued", job.started_at - job.queued_at)
    timings = job.timings
    for stage, keys in (("load", ("load_s",)), ("model", ("model_s",)), ("encode", ("encode_s", "validate_s"))):
        if any(key in timings for key in keys):
            metrics.observe_stage(stage, sum(timings.get(key, 0.0) for key in keys))


def earlier_report(ledger: Ledger, job: Job) -> dict:
    """The SRs (by role: sr, image_sr) of the latest earlier job of the same model on the same
    series (a study job: the same study) that wrote one, each the predecessor of the new one of its role."""
    from ..encoders.results import EarlierReport

    found = {}
    finished = ledger.earlier_results(job)  # newest first
    for role in ("sr", "image_sr"):
        earlier = [other for other in finished if role in other.outputs and f"{role}_series" in other.outputs]
        if earlier:
            latest = earlier[0]
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


def _write_outbox(layout: DataLayout, job: JobRecord, outcome) -> dict[str, str]:
    """The results' files in ``outbox/<job_id>/``; returns file name -> SOP Instance UID (what each
    destination is to confirm)."""
    folder = layout.job_outbox(job.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {}
    # ours: seg.dcm and sr.dcm (the SR alone for scores, classes and boxes); or a model's own objects
    for name, ds in outcome.result_objects().items():
        final = folder / name
        tmp = folder / f".tmp-{name}"
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(final)
        uids[final.name] = str(ds.SOPInstanceUID)
        role = final.stem  # seg, sr, or e.g. app-seg-1
        job.outputs[role] = str(ds.SOPInstanceUID)
        job.outputs[f"{role}_series"] = str(ds.SeriesInstanceUID)
    from ..worker.runtime import write_values

    write_values(outcome, folder)  # sidecars for the operator; only the .dcm files are delivered
    _keep_app_files(folder, outcome)
    job.state, job.reason = JobState.DELIVERING, ""
    return uids


@app.task(name="pacsworker.deliver", bind=True, acks_late=True, reject_on_worker_lost=True)
def deliver(self, job_id: str) -> str:
    """Send a job's results to each destination that is due; come back when the next one is due.

    The bookkeeping (per destination and instance, backoff, dead letters) is in
    :mod:`pacsworker.destinations.outbox`; here: the job's state and the next message.
    """
    set_correlation(job_id)
    from ..destinations.outbox import PENDING, Superseded, attempt_delivery

    settings = current_settings()
    layout = DataLayout(settings.data_dir)
    ledger = open_ledger(settings, "worker")
    try:
        outcomes = attempt_delivery(settings, layout, job_id, task_id=self.request.id or "")
    except Superseded:
        log.info("delivery %s: a newer deliver message is in charge; this one is dropped", job_id)
        return "superseded"
    if not outcomes:
        log.error("delivery %s: no results waiting in the ledger; nothing to send", job_id)
        return "missing"
    pending = [o.next_attempt_at for o in outcomes if o.state == PENDING]
    if pending:
        raise self.retry(countdown=max(0.0, min(pending) - ledger.now()), max_retries=None)
    if all(o.state == DeliveryState.DELIVERED.value for o in outcomes):
        return "delivered"
    return DeliveryState.DEAD_LETTER.value
