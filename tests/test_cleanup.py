"""``pacsworker cleanup``: finished, delivered series and outbox folders go; nothing unfinished ever does.

The data_dir is built with the project's own record and spool functions, as the receiver and the
workers write it, then aged by setting its timestamps back.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pacsworker.cli import app
from pacsworker.config import CONFIG_ENV
from pacsworker.records import (
    DataLayout,
    DeliveryRecord,
    DeliveryState,
    DestinationOutcome,
    JobRecord,
    JobState,
    SeriesRecord,
    SeriesState,
    write_json_atomic,
)
from pacsworker.retention import Retention, parse_age
from pacsworker.scp.spool import Spool

DAY = 86400.0
STUDY = "1.2.826.0.1.3680043.8.498.1"


class DataDir:
    """A data_dir with series in every state a cleanup must tell apart."""

    def __init__(self, root: Path):
        self.layout = DataLayout(root).create()
        self.spool = Spool(self.layout)
        self.count = 0

    def series(self, state: SeriesState, days_ago: float, job_state: JobState | None = None,
               delivered: bool | None = None, instances: int = 3) -> str:
        """A series received ``days_ago``, with one job (if ``job_state``) and its outbox (if ``delivered`` is set)."""
        self.count += 1
        uid = f"{STUDY}.{self.count}"
        when = time.time() - days_ago * DAY
        for n in range(instances):
            path = self.spool.store(uid, f"{uid}.{n + 1}", [b"DICM" + bytes(1000)])
            os.utime(path, (when, when))
        record = SeriesRecord(series_uid=uid, study_uid=STUDY, modality="CT", state=state, first_seen=when,
                              last_seen=when)
        if job_state is not None:
            job = JobRecord(job_id=f"job-{self.count}", series_uid=uid, study_uid=STUDY, model="ct-body",
                            spool_dir=str(self.layout.series_dir(uid)), state=job_state, queued_at=when,
                            finished_at=when if job_state != JobState.RUNNING else 0.0, heartbeat=when)
            write_json_atomic(self.layout.job_record(job.job_id), job)
            record.jobs = [job.job_id]
            if delivered is not None:
                self.outbox(job.job_id, delivered, when)
        write_json_atomic(self.layout.series_record(uid), record)
        return uid

    def outbox(self, job_id: str, delivered: bool, when: float) -> None:
        folder = self.layout.job_outbox(job_id)
        folder.mkdir(parents=True)
        for name in ("seg.dcm", "sr.dcm"):
            (folder / name).write_bytes(bytes(5000))
            os.utime(folder / name, (when, when))
        outcomes = {
            "pacs": DestinationOutcome(state=DeliveryState.DELIVERED, attempts=1, delivered_at=when),
            "archive": DestinationOutcome(
                state=DeliveryState.DELIVERED if delivered else DeliveryState.DEAD_LETTER, attempts=20,
                delivered_at=when if delivered else 0.0, last_error="" if delivered else "HTTP 401 from archive"),
        }
        write_json_atomic(self.layout.delivery_record(job_id),
                          DeliveryRecord(job_id=job_id, files=["seg.dcm", "sr.dcm"], destinations=outcomes))

    def spooled(self, uid: str) -> bool:
        return self.layout.series_dir(uid).is_dir()


@pytest.fixture()
def data(tmp_path, monkeypatch) -> DataDir:
    monkeypatch.setenv(CONFIG_ENV, "")  # the command sets it for its children; undone after the test
    return DataDir(tmp_path / "data")


def config(tmp_path: Path, data: DataDir, **storage) -> Path:
    path = tmp_path / "pacsworker.yaml"
    path.write_text(yaml.safe_dump({"storage": {"data_dir": str(data.layout.root), **storage}}))
    return path


def cleanup(*args: str):
    result = CliRunner().invoke(app, ["cleanup", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_finished_and_delivered_goes_unfinished_stays(tmp_path, data):
    done = data.series(SeriesState.DONE, 10, JobState.DONE, delivered=True)
    skipped = data.series(SeriesState.SKIPPED, 10)
    no_result = data.series(SeriesState.NO_RESULT, 10, JobState.NO_RESULT)
    receiving = data.series(SeriesState.RECEIVING, 10)
    running = data.series(SeriesState.QUEUED, 10, JobState.RUNNING)
    undelivered = data.series(SeriesState.DONE, 10, JobState.DELIVERING, delivered=False)
    failed = data.series(SeriesState.FAILED, 10, JobState.FAILED)
    recent = data.series(SeriesState.DONE, 2, JobState.DONE, delivered=True)

    output = cleanup("--config", str(config(tmp_path, data)), "--older-than", "7d")

    for uid in (done, skipped, no_result):
        assert not data.spooled(uid), f"finished series {uid} was kept"
        assert f"removed series {uid}" in output
        assert data.layout.series_record(uid).is_file(), "records stay: status keeps the history"
    for uid in (receiving, running, undelivered, failed, recent):
        assert data.spooled(uid), f"series {uid} was removed"
    assert not data.layout.job_outbox("job-1").exists(), "the delivered outbox folder stays"
    assert data.layout.delivery_record("job-6").is_file(), "undelivered results were removed"
    assert data.layout.job_outbox("job-8").is_dir(), "a recent outbox folder was removed"
    assert "removed 3 series" in output and "1 outbox folder(s)" in output
    assert "kept: " in output and "results not delivered" in output and "series receiving" in output


def test_dry_run_lists_with_sizes_and_removes_nothing(tmp_path, data):
    done = data.series(SeriesState.DONE, 10, JobState.DONE, delivered=True, instances=4)

    output = cleanup("--config", str(config(tmp_path, data)), "--older-than", "24h", "--dry-run")

    assert f"would remove series {done} (3.9 KiB" in output  # 4 instances of 1004 bytes
    assert re.search(r"would remove outbox job-1 \(1\d\.\d KiB", output)  # SEG, SR and delivery.json
    assert data.spooled(done) and data.layout.job_outbox("job-1").is_dir()


def test_retention_days_is_the_default_age(tmp_path, data):
    old = data.series(SeriesState.SKIPPED, 6)
    young = data.series(SeriesState.SKIPPED, 4)

    cleanup("--config", str(config(tmp_path, data, retention_days=5)))

    assert not data.spooled(old) and data.spooled(young)


def test_failed_series_only_on_request(tmp_path, data):
    failed = data.series(SeriesState.FAILED, 10, JobState.FAILED)
    withheld = data.series(SeriesState.IMPLAUSIBLE, 10, JobState.IMPLAUSIBLE)

    cleanup("--config", str(config(tmp_path, data)), "--older-than", "7d", "--include-failed")

    assert not data.spooled(failed) and not data.spooled(withheld)


def test_an_instance_arriving_during_cleanup_keeps_the_series(data):
    uid = data.series(SeriesState.DONE, 10, JobState.DONE, delivered=True)
    retention = Retention(data.layout)
    planned = [r for r in retention.plan(7 * DAY).removals if r.kind == "series"]
    assert [r.uid for r in planned] == [uid]

    data.spool.store(uid, f"{uid}.99", [b"DICM" + bytes(1000)])  # the receiver stores it before its record says so

    assert retention.remove(planned[0]) is False
    assert sorted(p.name for p in data.layout.series_dir(uid).iterdir()) == [
        f"{uid}.{n}.dcm" for n in (1, 2, 3, 99)], "a late instance or its series' earlier instances were lost"
    assert not any((data.layout.root / ".cleanup").iterdir())


def test_a_series_routed_again_after_planning_stays(data):
    uid = data.series(SeriesState.DONE, 10, JobState.DONE, delivered=True)
    retention = Retention(data.layout)
    planned = [r for r in retention.plan(7 * DAY).removals if r.kind == "series"]
    job = JobRecord(job_id="job-new", series_uid=uid, study_uid=STUDY, model="ct-body",
                    spool_dir=str(data.layout.series_dir(uid)))
    write_json_atomic(data.layout.job_record(job.job_id), job)
    record = SeriesRecord(series_uid=uid, study_uid=STUDY, state=SeriesState.QUEUED, jobs=[job.job_id])
    write_json_atomic(data.layout.series_record(uid), record)

    assert retention.remove(planned[0]) is False
    assert data.spooled(uid)


def test_bad_age_is_refused(tmp_path, data):
    result = CliRunner().invoke(app, ["cleanup", "--config", str(config(tmp_path, data)), "--older-than", "soon"])
    assert result.exit_code == 2
    assert parse_age("36h") == 36 * 3600 and parse_age("2") == 2 * DAY and parse_age("1.5w") == 1.5 * 7 * DAY
