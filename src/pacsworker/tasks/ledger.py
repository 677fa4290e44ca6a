"""Job ledger: one JSON file per job under ``data_dir/jobs``, with a heartbeat while it runs."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from ..records import DataLayout, JobRecord, read_json, write_json_atomic


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def load_job(layout: DataLayout, job_id: str) -> JobRecord:
    record = read_json(layout.job_record(job_id), JobRecord)
    if record is None:
        raise FileNotFoundError(f"job {job_id} has no record in {layout.jobs}")
    return record


def save_job(layout: DataLayout, record: JobRecord) -> None:
    write_json_atomic(layout.job_record(record.job_id), record)


class Heartbeat:
    """Refreshes a running job's heartbeat so that recovery sweeps can tell a dead worker."""

    def __init__(self, path: Path, interval: float):
        self.path, self.interval = path, interval
        self.stage = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)

    def _write(self) -> bool:
        with self._lock:
            record = read_json(self.path, JobRecord)
            if record is None:
                return False
            record.heartbeat, record.stage = time.time(), self.stage
            write_json_atomic(self.path, record)
            return True

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._write():
                return

    def set_stage(self, stage: str) -> None:
        """Record where the job is now (``status`` and the status page show it)."""
        self.stage = stage
        self._write()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
