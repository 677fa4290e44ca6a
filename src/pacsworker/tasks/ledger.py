"""A running job's heartbeat in the ledger (by the database's clock), and who this worker is."""

from __future__ import annotations

import logging
import os
import socket
import threading

from sqlalchemy.exc import SQLAlchemyError

from ..ledger import Ledger

log = logging.getLogger("pacsworker.tasks")


def worker_identity() -> str:
    """This worker process, as the ledger names who runs a job: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Beats for a running job so that the recovery sweep can tell a dead worker; stops once the
    job is no longer this worker's attempt (taken over, or ended)."""

    def __init__(self, ledger: Ledger, job_id: str, worker: str, attempt: int, interval: float):
        self.ledger, self.job_id, self.worker, self.attempt, self.interval = ledger, job_id, worker, attempt, interval
        self.stage = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)

    def _write(self, stage: str | None = None) -> bool:
        return self.ledger.heartbeat(self.job_id, self.worker, self.attempt, stage)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._write():
                    return  # not ours to beat for any more
            except SQLAlchemyError as exc:  # the database away for a moment: beat again next time
                log.warning("job heartbeat not written (%s); trying again", exc)

    def set_stage(self, stage: str) -> None:
        """Record where the job is now (``status`` and the status page show it); a failed write only logs."""
        self.stage = stage
        try:
            self._write(stage)
        except SQLAlchemyError as exc:
            log.warning("job stage %s not written (%s)", stage, exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
