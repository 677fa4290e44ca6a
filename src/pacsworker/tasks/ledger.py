"""Job ledger: one JSON file per job under ``data_dir/jobs``, with a heartbeat while it runs."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..records import DataLayout, JobRecord, read_json, record_lock, write_json_atomic

log = logging.getLogger("pacsworker.tasks")


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def load_job(layout: DataLayout, job_id: str) -> JobRecord:
    record = read_json(layout.job_record(job_id), JobRecord)
    if record is None:
        raise FileNotFoundError(f"job {job_id} has no record in {layout.jobs}")
    return record


def save_job(layout: DataLayout, record: JobRecord) -> None:
    write_json_atomic(layout.job_record(record.job_id), record)


def job_lock(layout: DataLayout, job_id: str):
    """Serialise claiming, beating and finishing one job across workers (and hosts sharing data_dir)."""
    return record_lock(layout.jobs, job_id)


class Heartbeat:
    """Refreshes a running job's heartbeat so that recovery sweeps can tell a dead worker."""

    def __init__(self, path: Path, interval: float, owner: str = ""):
        self.path, self.interval, self.owner = path, interval, owner  # owner: the worker that claimed it
        self.stage = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)

    def _write(self) -> bool:
        with self._lock, record_lock(self.path.parent, self.path.stem):
            record = read_json(self.path, JobRecord)
            if record is None or (self.owner and record.worker != self.owner):
                return False  # gone, or another worker took the job over: not ours to beat for
            record.heartbeat, record.stage = time.time(), self.stage
            write_json_atomic(self.path, record)
            return True

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._write():
                    return
            except OSError as exc:  # a full disk for a moment: beat again next time, never stop beating
                log.warning("job heartbeat not written (%s); trying again", exc.strerror or exc)

    def set_stage(self, stage: str) -> None:
        """Record where the job is now (``status`` and the status page show it); a failed write only logs."""
        self.stage = stage
        try:
            self._write()
        except OSError as exc:
            log.warning("job stage %s not written (%s)", stage, exc.strerror or exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
