"""The upgrade: a data_dir written by the release that kept its state in JSON records (written here
through that release's own record models and ``write_json_atomic``, as its roles wrote them) is
imported into the ledger on the first open, every fact queryable afterwards, the JSON moved aside;
a second open imports nothing, and an import interrupted after its transaction is finished, not
repeated."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pacsworker.config import Settings
from pacsworker.ledger import Ledger, close_ledgers, default_url, importer, open_ledger
from pacsworker.ledger.importer import import_json_records
from pacsworker.ledger.views import status_report
from pacsworker.records import (
    DataLayout,
    DeliveryRecord,
    DeliveryState,
    DestinationOutcome,
    InstanceOutcome,
    JobRecord,
    JobState,
    SeriesRecord,
    SeriesState,
    StudyRecord,
    write_json_atomic,
)
from pacsworker.scp.spool import Spool

STUDY = "1.2.826.0.1.3680043.8.498.7"
HOUR = 3600.0


def uid(n: int) -> str:
    return f"{STUDY}.{n}"


def todays_data_dir(root: Path) -> DataLayout:
    """Series in each state, jobs done, failed, running and queued, deliveries delivered, pending and
    dead-lettered, a study held for a study model: as today's release writes them."""
    layout = DataLayout(root).create()
    spool = Spool(layout)
    now = time.time()
    states = list(SeriesState)
    for n, state in enumerate(states, start=1):
        record = SeriesRecord(series_uid=uid(n), study_uid=STUDY, modality="CT", calling_aet="MODALITY",
                              body_part="CHEST", image_type=["ORIGINAL", "PRIMARY", "AXIAL"], instances=3, frames=3,
                              first_seen=now - n * HOUR, last_seen=now - n * HOUR + 10, state=state,
                              reason="modality: MR not in ['CT']" if state == SeriesState.SKIPPED else "",
                              content_digest=f"digest{n}", completed_by="quiet for 5 s")
        write_json_atomic(layout.series_record(record.series_uid), record)
        for i in range(1, 4):
            spool.store(uid(n), f"{uid(n)}.{i}", [b"DICM" + bytes(100)])
    job_states = {SeriesState.QUEUED: JobState.RUNNING, SeriesState.DONE: JobState.DONE,
                  SeriesState.FAILED: JobState.FAILED, SeriesState.NO_RESULT: JobState.NO_RESULT,
                  SeriesState.IMPLAUSIBLE: JobState.IMPLAUSIBLE}
    for n, state in enumerate(states, start=1):
        if state not in job_states:
            continue
        job_state = job_states[state]
        job = JobRecord(job_id=f"ct-body_{uid(n)}_digest{n}", series_uid=uid(n), study_uid=STUDY, model="ct-body",
                        spool_dir=str(layout.series_dir(uid(n))), state=job_state, attempts=1, worker="gpu1:42",
                        heartbeat=now - 5, queued_at=now - n * HOUR + 20, sent_at=now - n * HOUR + 21,
                        started_at=now - n * HOUR + 30, finished_at=0.0 if job_state == JobState.RUNNING else now - 60,
                        stage="model" if job_state == JobState.RUNNING else "",
                        values={"segments": {"Liver": {"volume_ml": 1500.0}}} if job_state == JobState.DONE else {},
                        reason="model ct-body failed: boom" if job_state == JobState.FAILED else "")
        write_json_atomic(layout.job_record(job.job_id), job)
        series = SeriesRecord.model_validate_json(layout.series_record(uid(n)).read_text())
        series.jobs = [job.job_id]
        write_json_atomic(layout.series_record(uid(n)), series)
    # a job of a series' earlier content, and a queued one of a series received again (a delivery pending)
    earlier = JobRecord(job_id=f"ct-body_{uid(4)}_old", series_uid=uid(4), study_uid=STUDY, model="ct-body",
                        spool_dir=str(layout.series_dir(uid(4))), state=JobState.DONE, finished_at=now - 9 * HOUR)
    write_json_atomic(layout.job_record(earlier.job_id), earlier)
    series = SeriesRecord.model_validate_json(layout.series_record(uid(4)).read_text())
    series.earlier_jobs = [earlier.job_id]
    write_json_atomic(layout.series_record(uid(4)), series)
    # deliveries: the done job delivered; the earlier job pending at one destination; the failed one dead-lettered
    files = ["seg.dcm", "sr.dcm"]
    sops = {"seg.dcm": f"{STUDY}.100.1", "sr.dcm": f"{STUDY}.100.2"}
    delivered = {f: InstanceOutcome(state=DeliveryState.DELIVERED, delivered_at=now - 50) for f in files}
    write_json_atomic(layout.delivery_record(f"ct-body_{uid(4)}_digest4"), DeliveryRecord(
        job_id=f"ct-body_{uid(4)}_digest4", files=files, sop_instance_uids=sops, task_id="task-1", destinations={
            "pacs": DestinationOutcome(state=DeliveryState.DELIVERED, attempts=1, delivered_at=now - 50,
                                       instances=delivered)}))
    write_json_atomic(layout.delivery_record(earlier.job_id), DeliveryRecord(
        job_id=earlier.job_id, files=files, sop_instance_uids=sops, destinations={
            "pacs": DestinationOutcome(state=DeliveryState.DELIVERED, attempts=1, instances=delivered),
            "archive": DestinationOutcome(state=DeliveryState.PENDING, attempts=3, last_error="HTTP 503",
                                          next_attempt_at=now + 60)}))
    write_json_atomic(layout.delivery_record(f"ct-body_{uid(5)}_digest5"), DeliveryRecord(
        job_id=f"ct-body_{uid(5)}_digest5", files=files, sop_instance_uids=sops, destinations={
            "pacs": DestinationOutcome(state=DeliveryState.DEAD_LETTER, attempts=20, permanent=True,
                                       last_error="HTTP 401 credentials refused", dead_lettered_at=now - 100,
                                       instances={f: InstanceOutcome(state=DeliveryState.PENDING, detail="401")
                                                  for f in files})}))
    write_json_atomic(layout.study_record(STUDY), StudyRecord(study_uid=STUDY, series={uid(4): "digest4"},
                                                              models=["study-model"], last_seen=now - HOUR,
                                                              waiting=True))
    (layout.series / "not-a-record.json").write_text("{broken")
    return layout


@pytest.fixture
def layout(tmp_path):
    return todays_data_dir(tmp_path / "data")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, layout):
    if request.param == "sqlite":
        return default_url(layout.root)
    return request.getfixturevalue("postgres_server").create_database()  # the import under its advisory lock


def test_every_fact_of_a_json_data_dir_is_queryable_after_the_import(layout, ledger_url, caplog):
    caplog.set_level("INFO", "pacsworker.ledger")
    with Ledger.open(ledger_url) as ledger:
        counts = import_json_records(ledger, layout.root)
        assert counts is not None and (counts.series, counts.jobs, counts.studies, counts.deliveries) == (7, 6, 1, 4)
        assert len(counts.unreadable) == 1
        assert ledger.state_counts("series") == {s.value: 1 for s in SeriesState}
        assert ledger.state_counts("job") == {"running": 1, "done": 2, "failed": 1, "no-result": 1, "implausible": 1}
        assert ledger.state_counts("delivery") == {"delivered": 2, "pending": 1, "dead-letter": 1}
        skipped = ledger.series(uid(3))
        assert (skipped.state, skipped.reason, skipped.calling_aet) == ("skipped", "modality: MR not in ['CT']",
                                                                        "MODALITY")
        assert skipped.facts == {"body_part": "CHEST", "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"]}
        assert [j.job_id for j in ledger.jobs_of_series(uid(4))] == [f"ct-body_{uid(4)}_digest4"]
        assert [j.job_id for j in ledger.jobs_of_series(uid(4), current=False)] == [f"ct-body_{uid(4)}_old"]
        running = ledger.job(f"ct-body_{uid(2)}_digest2")
        assert (running.state, running.stage, running.worker) == ("running", "model", "gpu1:42")
        # an unfinished job's worker loads what its spool folder held: its inputs
        assert ledger.job_inputs(running.job_id) == {uid(2): [f"{uid(2)}.{i}" for i in (1, 2, 3)]}
        assert ledger.job(f"ct-body_{uid(5)}_digest5").reason == "model ct-body failed: boom"
        [letter] = ledger.dead_letters()
        assert letter.permanent and letter.last_error == "HTTP 401 credentials refused"
        assert {i.sop_instance_uid for i in ledger.delivered_instances(letter.job_id)} == set(
            [f"{STUDY}.100.1", f"{STUDY}.100.2"])
        [pending] = ledger.deliveries_in_state("pending")
        assert (pending.job_id, pending.destination, pending.last_error) == (f"ct-body_{uid(4)}_old", "archive",
                                                                             "HTTP 503")
        assert ledger.job(f"ct-body_{uid(4)}_digest4").delivery_task == "task-1"
        study = ledger.study(STUDY)
        assert study.members == {uid(4): "digest4"} and study.waiting and study.models == ["study-model"]
        [earlier] = ledger.earlier_results(ledger.job(f"ct-body_{uid(4)}_digest4"))
        assert earlier.job_id == f"ct-body_{uid(4)}_old"
        report = status_report(ledger, {})
        assert report["pending_series"] == [uid(1)] and list(report["failed_jobs"]) == [f"ct-body_{uid(5)}_digest5"]
        assert report["dead_letters"][letter.job_id]["pacs"]["permanent"]
        [marker] = ledger.history(since_seconds=60)
        assert marker.kind == "imported" and "7 series, 6 jobs, 1 studies and 4 deliveries" in marker.reason
    # moved aside, the spool and outbox files stay
    assert not any(layout.series.glob("*.json")) and not any(layout.jobs.glob("*.json"))
    assert not any(layout.studies.glob("*.json")) and not any(layout.outbox.glob("*/delivery.json"))
    [aside] = (layout.root / ".pre-ledger").iterdir()
    assert (aside / "series" / f"{uid(1)}.json").is_file() and (aside / "series" / "not-a-record.json").is_file()
    assert (aside / "outbox" / f"ct-body_{uid(4)}_digest4" / "delivery.json").is_file()
    assert len(list(layout.spool.glob("*/*.dcm"))) == 21
    assert [r.message for r in caplog.records if "took over" in r.message] == [
        f"the ledger took over {layout.root}'s JSON records: 7 series, 6 jobs, 1 studies and 4 deliveries, "
        f"1 unreadable file(s) moved aside unread; the JSON files are kept in {aside}"]


def test_a_second_open_imports_nothing(layout):
    settings = Settings(storage={"data_dir": str(layout.root)})
    try:
        ledger = open_ledger(settings, "test")
        assert ledger.state_counts("series")["done"] == 1  # open_ledger imported
    finally:
        close_ledgers()
    with Ledger.open(default_url(layout.root)) as ledger:
        assert import_json_records(ledger, layout.root) is None
        assert sum(ledger.state_counts("job").values()) == 6


def test_an_import_stopped_before_its_files_were_moved_is_finished_not_repeated(layout, monkeypatch):
    def crash(*_args):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(importer, "_move_aside", crash)
    with Ledger.open(default_url(layout.root)) as ledger:
        with pytest.raises(KeyboardInterrupt):
            import_json_records(ledger, layout.root)
        monkeypatch.undo()
        assert any(layout.series.glob("*.json"))  # still there: the next open finishes
        counts = import_json_records(ledger, layout.root)
        assert counts is not None and counts.series == 0  # not imported again: the marker says it was
        assert ledger.state_counts("series") == {s.value: 1 for s in SeriesState}
        assert sum(ledger.state_counts("delivery").values()) == 4
        assert not any(layout.series.glob("*.json"))
        assert [e.kind for e in ledger.history(since_seconds=60)] == ["imported"]


def test_an_import_that_failed_midway_wrote_nothing(layout, monkeypatch):
    real = importer._insert
    calls = []

    def failing(tx, table, rows):
        calls.append(table.name)
        if table.name == "deliveries":
            raise OSError("disk full")
        real(tx, table, rows)

    monkeypatch.setattr(importer, "_insert", failing)
    with Ledger.open(default_url(layout.root)) as ledger:
        with pytest.raises(OSError):
            import_json_records(ledger, layout.root)
        assert ledger.series(uid(1)) is None and ledger.history(since_seconds=60) == []
        monkeypatch.undo()
        assert import_json_records(ledger, layout.root).series == 7
        assert ledger.state_counts("series") == {s.value: 1 for s in SeriesState}
