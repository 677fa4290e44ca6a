"""Routing a complete series into jobs: written once, sent until the broker took it, never blocked on it."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis
from conftest import free_port, missing, port_open, wait_until

from pacsworker.config import Settings
from pacsworker.records import DataLayout, JobRecord, JobState, SeriesRecord, SeriesState, read_json
from pacsworker.tasks.app import configure, model_queue
from pacsworker.tasks.ledger import save_job
from pacsworker.tasks.submit import recover, submit_series

SERIES = "1.2.826.0.1.3680043.9.7433.1.1"


def _record(instances: int = 12, digest: str = "aaaa") -> SeriesRecord:
    return SeriesRecord(
        series_uid=SERIES, study_uid="1.2.826.0.1.3680043.9.7433.1", modality="CT",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instances=instances, content_digest=digest,
    )


def _jobs(settings: Settings) -> list[JobRecord]:
    layout = DataLayout(settings.data_dir)
    return list(layout.iter_records(layout.jobs, JobRecord))


def _embedded(tmp_path) -> Settings:
    settings = Settings(storage={"data_dir": str(tmp_path / "data")})
    configure(settings)
    return settings


def _queued_messages(settings: Settings) -> int:
    return len([p for p in (DataLayout(settings.data_dir).broker).glob("*.msg")])


def test_same_content_makes_one_job_and_a_failed_one_runs_again(tmp_path):
    settings = _embedded(tmp_path)
    first = _record()
    submit_series(settings, first)
    assert first.state == SeriesState.QUEUED and len(first.jobs) == 1
    [job] = _jobs(settings)
    assert job.sent_at > 0 and _queued_messages(settings) == 1
    # the sender resends the same instances: the job stands, nothing new is sent
    again = _record()
    submit_series(settings, again)
    assert again.jobs == first.jobs and len(_jobs(settings)) == 1 and _queued_messages(settings) == 1
    # different content (one more instance) is a different job
    more = _record(instances=13, digest="bbbb")
    submit_series(settings, more)
    assert len(_jobs(settings)) == 2 and _queued_messages(settings) == 2
    # a job that failed runs again when its series is resent
    job.state, job.reason, job.attempts = JobState.FAILED, "worker lost", 3
    save_job(DataLayout(settings.data_dir), job)
    submit_series(settings, _record())
    rerun = read_json(DataLayout(settings.data_dir).job_record(job.job_id), JobRecord)
    assert rerun.state == JobState.QUEUED and rerun.attempts == 0 and _queued_messages(settings) == 3


def test_series_record_says_how_it_ended(tmp_path):
    from pacsworker.records import save_series, settle_series_of

    settings = _embedded(tmp_path)
    layout = DataLayout(settings.data_dir)
    record = _record()
    submit_series(settings, record)
    save_series(layout, record)
    assert read_json(layout.series_record(SERIES), SeriesRecord).state == SeriesState.QUEUED
    [job] = _jobs(settings)
    for state, expected in ((JobState.NO_RESULT, SeriesState.NO_RESULT), (JobState.DONE, SeriesState.DONE),
                            (JobState.FAILED, SeriesState.FAILED)):
        job.state, job.reason = state, "" if state == JobState.DONE else "a reason"
        save_job(layout, job)
        settle_series_of(layout, SERIES)
        ended = read_json(layout.series_record(SERIES), SeriesRecord)
        assert ended.state == expected and ended.jobs == [job.job_id]
        assert ("ct-body: a reason" in ended.reason) == (state != JobState.DONE)


@pytest.fixture
def redis_port(tmp_path):
    binary = shutil.which("redis-server")
    if not binary:
        missing("redis-server")
    return binary, free_port()


def test_broker_down_routing_does_not_block_and_the_sweep_sends_later(tmp_path, redis_port):
    binary, port = redis_port
    settings = Settings(
        storage={"data_dir": str(tmp_path / "data")},
        queue={"broker_url": f"redis://127.0.0.1:{port}/0", "publish_timeout_seconds": 1},
    )
    configure(settings)
    record = _record()
    started = time.monotonic()
    submit_series(settings, record)  # nothing listens on the broker's port
    blocked = time.monotonic() - started
    print(f"routing with the broker down returned after {blocked:.2f} s")
    assert record.state == SeriesState.QUEUED
    [job] = _jobs(settings)
    assert job.state == JobState.QUEUED and job.sent_at == 0 and job.attempts == 0
    assert blocked < 10, "routing must not wait for the broker"
    assert recover(settings) == 0  # still down: nothing sent, nothing lost
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 15, what="redis-server")
        assert wait_until(lambda: recover(settings), 30, interval=1, what="the sweep to send the job") == 1
        [sent] = _jobs(settings)
        assert sent.sent_at > 0
        client = redis.Redis(port=port)
        assert client.llen(model_queue("ct-body")) == 1  # the broker holds exactly one message
        assert recover(settings) == 0  # and it is not sent twice
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_new_content_supersedes_and_the_series_follows_its_latest_job(tmp_path):
    from pacsworker.records import save_series, settle_series_of

    settings = _embedded(tmp_path)
    layout = DataLayout(settings.data_dir)
    first = _record()
    submit_series(settings, first)
    save_series(layout, first)
    [old_id] = first.jobs
    old = read_json(layout.job_record(old_id), JobRecord)
    old.state, old.reason = JobState.FAILED, "cut short"
    save_job(layout, old)
    # more instances arrived: a new routing, a new job; the failed one is history
    grown = read_json(layout.series_record(SERIES), SeriesRecord)
    grown.instances, grown.content_digest, grown.state = 20, "cccc", SeriesState.RECEIVING
    submit_series(settings, grown)
    save_series(layout, grown)
    [new_id] = grown.jobs
    assert new_id != old_id and grown.earlier_jobs == [old_id]
    new = read_json(layout.job_record(new_id), JobRecord)
    new.state = JobState.DONE
    save_job(layout, new)
    settle_series_of(layout, SERIES)
    assert read_json(layout.series_record(SERIES), SeriesRecord).state == SeriesState.DONE


def test_a_newer_model_version_reruns_and_its_sr_names_the_earlier_one(tmp_path, dicom_dir):
    import shutil

    import pydicom
    from conftest import dciodvfy_errors

    from pacsworker.scp.tracker import content_digest
    from pacsworker.tasks.jobs import process_series

    source = sorted((dicom_dir / "ct06_ge_lightspeed_liver_3slice").glob("*.dcm"))
    first = pydicom.dcmread(source[0], stop_before_pixels=True)
    layout = DataLayout(tmp_path / "data").create()
    spool = layout.series_dir(str(first.SeriesInstanceUID))
    spool.mkdir(parents=True)
    uids = set()
    for path in source:
        uids.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        shutil.copy(path, spool / path.name)
    record = SeriesRecord(series_uid=str(first.SeriesInstanceUID), study_uid=str(first.StudyInstanceUID), modality="CT",
                          sop_class_uid=str(first.SOPClassUID), instances=len(source), content_digest=content_digest(uids))
    jobs = []
    for version in ("1.0.0", "2.0.0", "2.0.0"):
        settings = Settings(storage={"data_dir": str(tmp_path / "data")},
                            models=[{"name": "ct-body", "version": version, "match": {"min_instances": 1}}])
        configure(settings)
        routed = record.model_copy()
        submit_series(settings, routed)
        [job_id] = routed.jobs
        if job_id not in jobs:
            jobs.append(job_id)
            assert process_series(job_id) == "delivering"
    assert len(jobs) == 2, "a new version is a new job; the same version again is the same job"
    old, new = (read_json(layout.job_record(job_id), JobRecord) for job_id in jobs)
    assert old.outputs["sr"] != new.outputs["sr"] and old.outputs["seg"] != new.outputs["seg"]
    for role in ("sr", "image_sr"):  # each SR names the earlier one of its kind
        sr = pydicom.dcmread(layout.job_outbox(new.job_id) / f"{role}.dcm")
        [study] = sr.PredecessorDocumentsSequence
        [series] = study.ReferencedSeriesSequence
        assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (str(first.StudyInstanceUID), old.outputs[f"{role}_series"])
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.outputs[role] != new.outputs[role]
        assert dciodvfy_errors(layout.job_outbox(new.job_id) / f"{role}.dcm") == []
        assert "PredecessorDocumentsSequence" not in pydicom.dcmread(layout.job_outbox(old.job_id) / f"{role}.dcm")
