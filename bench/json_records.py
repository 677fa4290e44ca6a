"""Today's JSON design, for bench/ledger.py to time beside the ledger.

A ``data_dir`` is filled with the history the ledger side gets (the same series, with the same
active work) as the current code writes it: per series ``series/<uid>.json`` (SeriesRecord), per job
``jobs/<job_id>.json`` (JobRecord; the id as ``tasks/submit.py`` names it) and, once a job made
results, ``outbox/<job_id>/delivery.json`` (DeliveryRecord, as ``tasks/jobs.py`` writes it and
``destinations/outbox.py`` updates it), plus the lock files those writers leave behind
(``series/.<uid>.lock``, ``jobs/.<job_id>.lock``, ``outbox/<job_id>/.lock``; they are never removed,
and every listing of the folders reads them too). Each record holds exactly the bytes
``write_json_atomic`` would write (``model_dump_json(indent=2)``); only the temp file, fsync and rename
are left out to fill fast. The result files (seg.dcm, sr.dcm) are not written: nothing timed here
reads them.

Since the ledger replaced them, that code is no longer this checkout's: bench/ledger.py extracts the
last revision that had it and runs this file in a process of its own with ``pacsworker`` imported
from there. The operations are that code's real functions, not copies: the ``status`` command
(``pacsworker status --json``, output thrown away), the recovery sweep (``tasks/submit.recover``:
with every queued job sent, no heartbeat it has watched go silent, and no delivery overdue, it sends
nothing and needs no broker), one claim (``tasks/jobs._claim`` under ``job_lock``, as
``process_series`` calls it) and one earlier-result lookup (``tasks/jobs.earlier_report`` of a done
job, its record loaded as the worker does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pacsworker.config import load_settings  # from the source bench/ledger.py gives (PYTHONPATH)
from pacsworker.records import (
    DataLayout,
    DeliveryRecord,
    DeliveryState,
    DestinationOutcome,
    InstanceOutcome,
    JobRecord,
    JobState,
    ReceiverRecord,
    SeriesRecord,
    SeriesState,
)
from pacsworker.worker.model_files import job_fingerprint

MODEL = "ct-body"
DESTINATION = "pacs"
FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def _write(path: str, text: str) -> None:
    fd = os.open(path, FLAGS, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _touch(path: str) -> None:
    os.close(os.open(path, FLAGS, 0o644))


class JsonHistory:
    """A data_dir of ``n`` series in today's JSON records, and the functions that read it."""

    def __init__(self, n: int, now: float, uid: Callable[[int, int], str], job_state, active_receiving: int,
                 parent: str | None = None):
        self.n, self.now, self.uid, self.job_state, self.active_receiving = n, now, uid, job_state, active_receiving
        self.root = Path(tempfile.mkdtemp(prefix="json-bench-", dir=parent))
        self.config = self.root / "pacsworker.yaml"
        self.config.write_text(f"storage:\n  data_dir: {self.root / 'data'}\n")
        self.settings = load_settings(self.config)
        self.layout = DataLayout(self.settings.data_dir).create()
        self.fingerprint = job_fingerprint(self.settings.model(MODEL))
        self.files = 0

    def job_id(self, i: int) -> str:
        """As ``submit.job_id_for`` names it: model, series, content digest, model fingerprint."""
        return f"{MODEL}_{self.uid(2, i)}_{i:016x}_{self.fingerprint}"

    # -- filling -----------------------------------------------------------------------------------------

    def fill(self) -> float:
        """Write the history; seconds it took."""
        start = time.perf_counter()
        n, now, uid, layout = self.n, self.now, self.uid, self.layout
        t0 = now - n * 0.1 - 3600
        series_dir, jobs_dir = str(layout.series), str(layout.jobs)
        for i in range(n):
            t = t0 + i * 0.1
            series_uid = uid(2, i)
            receiving = i >= n - self.active_receiving
            job_id = self.job_id(i)
            if receiving:
                state, jobs = SeriesState.RECEIVING, []
            else:
                job_state = self.job_state(i)[0]
                state = {"queued": SeriesState.QUEUED, "running": SeriesState.QUEUED,
                         "delivering": SeriesState.QUEUED, "failed": SeriesState.FAILED}.get(job_state, SeriesState.DONE)
                jobs = [job_id]
            series = SeriesRecord(
                series_uid=series_uid, study_uid=uid(3, i // 4), modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                calling_aet="MODALITY", body_part="CHEST", series_description="CT CHEST ABDOMEN 1.0 B30f",
                image_type=["ORIGINAL", "PRIMARY", "AXIAL"], orientation="axial", instances=2, frames=2,
                first_seen=t, last_seen=t + 5, state=state, jobs=jobs,
                content_digest="" if receiving else f"{i:016x}", completed_by="" if receiving else "quiet for 5 s",
                contiguous=None if receiving else True,
            )
            _write(f"{series_dir}/{series_uid}.json", series.model_dump_json(indent=2))
            self.files += 1
            if not receiving:  # save_series / settle_series_of took its lock
                _touch(f"{series_dir}/.{series_uid}.lock")
                self._fill_job(i, t, jobs_dir)
        receiver = ReceiverRecord(host="bench", pid=os.getpid(), ae_title="PACSWORKER", ports={"dimse": 11112},
                                  started_at=now - 3600, heartbeat=now)
        _write(str(layout.receivers / "bench-11112.json"), receiver.model_dump_json(indent=2))
        return time.perf_counter() - start

    def _fill_job(self, i: int, t: float, jobs_dir: str) -> None:
        uid, now = self.uid, self.now
        state, sent, beat = self.job_state(i)
        job_id = self.job_id(i)
        job = JobRecord(
            job_id=job_id, series_uid=uid(2, i), study_uid=uid(3, i // 4), model=MODEL,
            spool_dir=str(self.layout.series_dir(uid(2, i))), queued_at=t + 6, sent_at=sent,
        )
        if state != "queued":
            job.attempts, job.worker, job.started_at = 1, "worker-1:4242", t + 7 if state == "done" else now - 30
            job.heartbeat = beat or job.started_at + 20
        if state == "running":
            job.state, job.stage = JobState.RUNNING, "model"
        elif state != "queued":
            job.state = {"delivering": JobState.DELIVERING, "failed": JobState.FAILED}.get(state, JobState.DONE)
            job.finished_at = job.started_at + 23
            job.timings = {"load_s": 1.8, "model_s": 17.2, "encode_s": 3.1, "validate_s": 0.4}
            job.outputs = {"seg": uid(9, 2 * i), "seg_series": uid(10, i), "sr": uid(9, 2 * i + 1), "sr_series": uid(6, i)}
            if state == "done":
                job.timings["delivered_at"] = t + 40
            if state == "failed":
                job.reason = f"delivery dead-lettered (`pacsworker deliveries retry {job_id}`): {DESTINATION}: 503"
            self._fill_delivery(i, t, job, state)
        _write(f"{jobs_dir}/{job_id}.json", job.model_dump_json(indent=2))
        self.files += 1
        if state != "queued":  # process_series took the job's lock to claim and to finish it
            _touch(f"{jobs_dir}/.{job_id}.lock")

    def _fill_delivery(self, i: int, t: float, job: JobRecord, state: str) -> None:
        files = {"seg.dcm": job.outputs["seg"], "sr.dcm": job.outputs["sr"]}
        d = {"delivering": DeliveryState.PENDING, "failed": DeliveryState.DEAD_LETTER}.get(state, DeliveryState.DELIVERED)
        delivered = d == DeliveryState.DELIVERED
        outcome = DestinationOutcome(
            state=d, attempts=1 if delivered else 3, last_error="" if delivered else "503",
            delivered_at=t + 40 if delivered else 0.0,
            # an hour out: the sweep must not find it overdue while the bench runs (it would send)
            next_attempt_at=self.now + 3600 if d == DeliveryState.PENDING else 0.0,
            dead_lettered_at=self.now - i * 0.001 if d == DeliveryState.DEAD_LETTER else 0.0,
            instances={name: InstanceOutcome(state=DeliveryState.DELIVERED if delivered else DeliveryState.PENDING,
                                             detail="stored" if delivered else "503",
                                             delivered_at=t + 40 if delivered else 0.0) for name in files},
        )
        record = DeliveryRecord(
            job_id=job.job_id, files=list(files), sop_instance_uids=files, destinations={DESTINATION: outcome},
            started_at=t + 30, next_attempt_at=outcome.next_attempt_at, task_id=f"{i:08x}-0000-4000-8000-{i:012x}",
        )
        folder = self.layout.job_outbox(job.job_id)
        os.mkdir(folder)
        _write(f"{folder}/delivery.json", record.model_dump_json(indent=2))
        _touch(f"{folder}/.lock")  # outbox_lock, taken by every delivery attempt
        self.files += 1

    # -- the operations, as the current code does them -----------------------------------------------------

    def status(self) -> None:
        """``pacsworker status --json`` (the command's function, in this process; its output thrown away)."""
        from pacsworker.cli import status

        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            status(config=self.config, as_json=True)

    def sweep(self) -> None:
        """One recovery sweep, as the receiver runs it every 5 s."""
        from pacsworker.tasks.submit import recover

        sent = recover(self.settings)
        assert sent == 0, f"the sweep sent {sent} message(s): the bench has no broker"

    def claim(self, job_id: str) -> None:
        """A worker taking a queued job, as ``process_series`` does."""
        from pacsworker.tasks.jobs import _claim
        from pacsworker.tasks.ledger import job_lock

        with job_lock(self.layout, job_id):
            claimed = _claim(self.settings, self.layout, job_id)
        assert isinstance(claimed, JobRecord), claimed

    def earlier(self, job_id: str) -> None:
        """The predecessor-SR lookup every job makes before it runs its model."""
        from pacsworker.tasks.jobs import earlier_report
        from pacsworker.tasks.ledger import load_job

        earlier_report(self.layout, load_job(self.layout, job_id))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def measure(n: int) -> dict[str, float]:
    """The same history as bench/ledger.py's, timed the same way (median of runs after a warm-up)."""
    from ledger import ACTIVE, _uid, history_job_state, timed

    now = time.time()
    history = JsonHistory(n, now, _uid, lambda i: history_job_state(n, now, i), ACTIVE["receiving"])
    try:
        filled = history.fill()
        done = [history.job_id(i) for i in range(0, max(1, n - 200), max(1, n // 50))]
        queued = [history.job_id(n - ACTIVE["receiving"] - 1 - k) for k in range(ACTIVE["queued"])]
        runs = 7 if n <= 10_000 else 3  # 100,000: seconds per run
        return {
            "fill_s": filled,
            "files": float(history.files),
            "status_ms": timed(lambda _: history.status(), runs),
            "sweep_ms": timed(lambda _: history.sweep(), runs),
            "claim_ms": timed(lambda run: history.claim(queued[run]), 7),
            "earlier_ms": timed(lambda run: history.earlier(done[run % len(done)]), runs),
        }
    finally:
        history.remove()


if __name__ == "__main__":  # bench/ledger.py runs it: json_records.py N SOURCE, with PYTHONPATH=SOURCE
    import json
    import sys

    import pacsworker

    assert Path(pacsworker.__file__).resolve().is_relative_to(Path(sys.argv[2]).resolve()), pacsworker.__file__
    print(json.dumps(measure(int(sys.argv[1]))))
