"""``pacsworker cleanup``: finished, delivered series and outbox folders go; nothing unfinished ever does;
history older than storage.history_days is trimmed from the ledger.

The ledger is filled through its transitions, as the receiver and the workers fill it, and the spool
with the project's own spool functions; then both are aged by setting their times back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ledger_fill import age, deliver, fail_delivery, received, run
from pacsworker.cli import app
from pacsworker.config import CONFIG_ENV
from pacsworker.ledger import Ledger, NewJob, close_ledgers, default_url
from pacsworker.records import DataLayout, JobState, SeriesState
from pacsworker.retention import Retention, parse_age
from pacsworker.scp.spool import Spool

DAY = 86400.0
STUDY = "1.2.826.0.1.3680043.8.498.1"
RESULTS = {"seg.dcm": f"{STUDY}.900.1", "sr.dcm": f"{STUDY}.900.2"}


class DataDir:
    """A data_dir and its ledger with series in every state a cleanup must tell apart."""

    def __init__(self, root: Path):
        self.layout = DataLayout(root).create()
        self.spool = Spool(self.layout)
        self.ledger = Ledger.open(default_url(root))
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
        sops = received(self.ledger, uid, STUDY, instances)
        job_ids = []
        if state == SeriesState.SKIPPED:
            assert self.ledger.skip_series(uid, "modality: MR not in ['CT']")
        elif job_state is not None:
            job_id = f"job-{self.count}"
            job_ids.append(job_id)
            self.ledger.route_series(uid, [NewJob(job_id, uid, STUDY, "ct-body", {uid: sops},
                                                  spool_dir=str(self.layout.series_dir(uid)))])
            if job_state == JobState.RUNNING:
                assert self.ledger.mark_sent(job_id)
                assert self.ledger.claim_job(job_id, "gpu1:1", max_attempts=3, stale_after=600).won
            elif delivered is not None:
                run(self.ledger, job_id, "delivering", results=RESULTS, destinations=["archive", "pacs"])
                deliver(self.ledger, job_id, "pacs", RESULTS)
                if delivered:
                    deliver(self.ledger, job_id, "archive", RESULTS)
                else:
                    fail_delivery(self.ledger, job_id, "archive", RESULTS, "HTTP 401 from archive", permanent=True)
                self.outbox(job_id, when)
            else:
                run(self.ledger, job_id, job_state.value, reason="" if job_state == JobState.DONE else "why")
        age(self.ledger, days_ago * DAY, series_uids=[uid], job_ids=job_ids)
        return uid

    def outbox(self, job_id: str, when: float) -> None:
        folder = self.layout.job_outbox(job_id)
        folder.mkdir(parents=True)
        for name in ("seg.dcm", "sr.dcm"):
            (folder / name).write_bytes(bytes(5000))
            os.utime(folder / name, (when, when))

    def spooled(self, uid: str) -> bool:
        return self.layout.series_dir(uid).is_dir()


@pytest.fixture()
def data(tmp_path, monkeypatch) -> DataDir:
    monkeypatch.setenv(CONFIG_ENV, "")  # the command sets it for its children; undone after the test
    made = DataDir(tmp_path / "data")
    yield made
    made.ledger.close()
    close_ledgers()


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
    assert [data.ledger.series(uid).state for uid in (done, skipped, no_result, receiving, running, undelivered)] == [
        "done", "skipped", "no-result", "receiving", "queued", "failed"]

    output = cleanup("--config", str(config(tmp_path, data)), "--older-than", "7d")

    for uid in (done, skipped, no_result):
        assert not data.spooled(uid), f"finished series {uid} was kept"
        assert f"removed series {uid}" in output
        assert data.ledger.series(uid).state, "the ledger's rows stay: status keeps the states"
    for uid in (receiving, running, undelivered, failed, recent):
        assert data.spooled(uid), f"series {uid} was removed"
    assert not data.layout.job_outbox("job-1").exists(), "the delivered outbox folder stays"
    assert data.layout.job_outbox("job-6").is_dir(), "undelivered results were removed"
    assert data.layout.job_outbox("job-8").is_dir(), "a recent outbox folder was removed"
    assert "removed 3 series" in output and "1 outbox folder(s)" in output
    assert "kept: " in output and "results not delivered" in output and "series receiving" in output


def test_dry_run_lists_with_sizes_and_removes_nothing(tmp_path, data):
    done = data.series(SeriesState.DONE, 10, JobState.DONE, delivered=True, instances=4)

    output = cleanup("--config", str(config(tmp_path, data)), "--older-than", "24h", "--dry-run")

    assert f"would remove series {done} (3.9 KiB" in output  # 4 instances of 1004 bytes
    assert "would remove outbox job-1 (9.8 KiB" in output  # SEG and SR
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
    retention = Retention(data.layout, data.ledger)
    planned = [r for r in retention.plan(7 * DAY).removals if r.kind == "series"]
    assert [r.uid for r in planned] == [uid]

    data.spool.store(uid, f"{uid}.99", [b"DICM" + bytes(1000)])  # the receiver stores it before its record says so

    assert retention.remove(planned[0]) is False
    assert sorted(p.name for p in data.layout.series_dir(uid).iterdir()) == [
        f"{uid}.{n}.dcm" for n in (1, 2, 3, 99)], "a late instance or its series' earlier instances were lost"
    assert not any((data.layout.root / ".cleanup").iterdir())


def test_a_series_routed_again_after_planning_stays(data):
    uid = data.series(SeriesState.DONE, 10, JobState.DONE, delivered=True)
    retention = Retention(data.layout, data.ledger)
    planned = [r for r in retention.plan(7 * DAY).removals if r.kind == "series"]
    sops = received(data.ledger, uid, STUDY, 4)  # received again: receiving, then routed to a new job
    assert not retention.remove(planned[0]) and data.spooled(uid)
    data.ledger.route_series(uid, [NewJob("job-new", uid, STUDY, "ct-body", {uid: sops})])

    assert retention.remove(planned[0]) is False
    assert data.spooled(uid)


def test_history_older_than_history_days_is_trimmed(tmp_path, data):
    old = data.series(SeriesState.SKIPPED, 100)
    age(data.ledger, 100 * DAY, all_events=True)
    young = data.series(SeriesState.SKIPPED, 1)
    assert {e.series_uid for e in data.ledger.history(since_seconds=1000 * DAY)} == {old, young}

    dry = cleanup("--config", str(config(tmp_path, data, history_days=30)), "--dry-run")
    assert "history older than 30 d would be trimmed" in dry and len(data.ledger.history(series_uid=old)) == 3
    output = cleanup("--config", str(config(tmp_path, data, history_days=30)))

    assert "3 history event(s) older than 30 d trimmed" in output  # received, completed, routed
    assert data.ledger.history(series_uid=old) == [] and len(data.ledger.history(series_uid=young)) == 3
    assert data.ledger.series(old).state == "skipped", "states stay; only events are trimmed"


def test_bad_age_is_refused(tmp_path, data):
    result = CliRunner().invoke(app, ["cleanup", "--config", str(config(tmp_path, data)), "--older-than", "soon"])
    assert result.exit_code == 2
    assert parse_age("36h") == 36 * 3600 and parse_age("2") == 2 * DAY and parse_age("1.5w") == 1.5 * 7 * DAY
