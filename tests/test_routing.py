"""Routing a complete series into jobs: written once, sent until the broker took it, never blocked on it."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from conftest import free_port, ledger_of, missing, port_open, wait_until
from pacsworker.config import Settings
from pacsworker.records import DataLayout, JobState, SeriesRecord, SeriesState
from pacsworker.tasks.app import configure
from pacsworker.tasks.queues import model_queue
from pacsworker.tasks.submit import recover, submit_series

SERIES = "1.2.826.0.1.3680043.9.7433.1.1"


def _record(instances: int = 12, digest: str = "aaaa") -> SeriesRecord:
    return SeriesRecord(
        series_uid=SERIES, study_uid="1.2.826.0.1.3680043.9.7433.1", modality="CT",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instances=instances, content_digest=digest,
    )


def _ledger(settings: Settings):
    return ledger_of(settings.data_dir, settings.storage.database_url)


def _jobs(settings: Settings):
    return _ledger(settings).latest_jobs(100)


def _receive(settings: Settings, record: SeriesRecord) -> None:
    """What the receiver does before routing: the series received (again) and complete in the ledger."""
    from pacsworker.scp.tracker import _facts

    ledger = _ledger(settings)
    ledger.record_instance(_facts(record), instances=record.instances)
    ledger.complete_series(record.series_uid, instances=record.instances, frames=0, content_digest=record.content_digest,
                           completed_by="test")
    submit_series(settings, record)


def _end(settings: Settings, job_id: str, state: JobState, reason: str = "") -> None:
    """A worker ran the job and it ended so."""
    ledger = _ledger(settings)
    claim = ledger.claim_job(job_id, "w", 3, 60)
    assert claim.won and claim.job is not None
    results = {"sr.dcm": "1.2.3.4"} if state == JobState.DELIVERING else None
    assert ledger.finish_job(job_id, "w", claim.job.attempts, state, reason=reason, results=results,
                             destinations=["results"] if results else ())


def _embedded(tmp_path) -> Settings:
    settings = Settings(storage={"data_dir": str(tmp_path / "data")})
    configure(settings)
    return settings


def _queued_messages(settings: Settings) -> int:
    return len([p for p in (DataLayout(settings.data_dir).broker).glob("*.msg")])


def test_same_content_makes_one_job_and_a_failed_one_runs_again(tmp_path):
    settings = _embedded(tmp_path)
    _receive(settings, _record())
    [job] = _ledger(settings).jobs_of_series(SERIES)
    assert _ledger(settings).series(SERIES).state == SeriesState.QUEUED
    assert _ledger(settings).job(job.job_id).sent_at > 0 and _queued_messages(settings) == 1
    # the sender resends the same instances: the job stands, nothing new is sent
    _receive(settings, _record())
    assert [j.job_id for j in _ledger(settings).jobs_of_series(SERIES)] == [job.job_id]
    assert len(_jobs(settings)) == 1 and _queued_messages(settings) == 1
    # different content (one more instance) is a different job
    _receive(settings, _record(instances=13, digest="bbbb"))
    assert len(_jobs(settings)) == 2 and _queued_messages(settings) == 2
    # a job that failed runs again when its series is resent
    _end(settings, job.job_id, JobState.FAILED, "worker lost")
    _receive(settings, _record())
    rerun = _ledger(settings).job(job.job_id)
    assert rerun.state == JobState.QUEUED and rerun.attempts == 0 and _queued_messages(settings) == 3


@pytest.mark.parametrize("state, expected", [(JobState.NO_RESULT, SeriesState.NO_RESULT),
                                             (JobState.DELIVERING, SeriesState.QUEUED),
                                             (JobState.FAILED, SeriesState.FAILED)])
def test_series_record_says_how_it_ended(tmp_path, state, expected):
    settings = _embedded(tmp_path)
    _receive(settings, _record())
    assert _ledger(settings).series(SERIES).state == SeriesState.QUEUED
    [job] = _ledger(settings).jobs_of_series(SERIES)
    _end(settings, job.job_id, state, "" if state == JobState.DELIVERING else "a reason")
    ended = _ledger(settings).series(SERIES)
    assert ended.state == expected and [j.job_id for j in _ledger(settings).jobs_of_series(SERIES)] == [job.job_id]
    assert ("ct-body: a reason" in ended.reason) == (state != JobState.DELIVERING)
    if state == JobState.DELIVERING:  # delivered: done
        _ledger(settings).record_attempt(job.job_id, "results", {"sr.dcm": "stored"}, {})
        assert _ledger(settings).series(SERIES).state == SeriesState.DONE


@pytest.fixture
def redis_port(tmp_path):
    binary = shutil.which("redis-server")
    if not binary:
        missing("redis-server")
    return binary, free_port()


def test_broker_down_routing_does_not_block_and_the_sweep_sends_later(tmp_path, redis_port, database_url):
    binary, port = redis_port
    settings = Settings(  # roles as on several hosts: Redis for the messages, the ledger in PostgreSQL
        storage={"data_dir": str(tmp_path / "data"), "database_url": database_url},
        queue={"broker_url": f"redis://127.0.0.1:{port}/0", "publish_timeout_seconds": 1},
    )
    configure(settings)
    record = _record()
    started = time.monotonic()
    _receive(settings, record)  # nothing listens on the broker's port
    blocked = time.monotonic() - started
    print(f"routing with the broker down returned after {blocked:.2f} s")
    assert _ledger(settings).series(SERIES).state == SeriesState.QUEUED
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
    settings = _embedded(tmp_path)
    _receive(settings, _record())
    [old] = _ledger(settings).jobs_of_series(SERIES)
    _end(settings, old.job_id, JobState.FAILED, "cut short")
    assert _ledger(settings).series(SERIES).state == SeriesState.FAILED
    # more instances arrived: a new routing, a new job; the failed one is history
    _receive(settings, _record(instances=20, digest="cccc"))
    [new] = _ledger(settings).jobs_of_series(SERIES)
    assert new.job_id != old.job_id
    assert [j.job_id for j in _ledger(settings).jobs_of_series(SERIES, current=False)] == [old.job_id]
    _end(settings, new.job_id, JobState.DELIVERING)
    _ledger(settings).record_attempt(new.job_id, "results", {"sr.dcm": "stored"}, {})
    assert _ledger(settings).series(SERIES).state == SeriesState.DONE


def test_a_newer_model_version_reruns_and_its_sr_names_the_earlier_one(tmp_path, dicom_dir):
    import pydicom

    from conftest import dciodvfy_errors, spool_series
    from pacsworker.tasks.jobs import process_series

    layout, record, first = spool_series(dicom_dir / "ct06_ge_lightspeed_liver_3slice", tmp_path / "data")
    jobs = []
    for version in ("1.0.0", "2.0.0", "2.0.0"):
        settings = Settings(storage={"data_dir": str(tmp_path / "data")},
                            models=[{"name": "ct-body", "version": version, "match": {"min_instances": 1}}])
        configure(settings)
        _receive(settings, record.model_copy())
        [job_id] = [j.job_id for j in ledger_of(settings.data_dir).jobs_of_series(record.series_uid)]
        if job_id not in jobs:
            jobs.append(job_id)
            assert process_series(job_id) == "delivering"
    assert len(jobs) == 2, "a new version is a new job; the same version again is the same job"
    old, new = (ledger_of(layout.root).job(job_id) for job_id in jobs)
    assert old.outputs["sr"] != new.outputs["sr"] and old.outputs["seg"] != new.outputs["seg"]
    for role in ("sr", "image_sr"):  # each SR names the earlier one of its kind
        sr = pydicom.dcmread(layout.job_outbox(new.job_id) / f"{role}.dcm")
        [study] = sr.PredecessorDocumentsSequence
        [series] = study.ReferencedSeriesSequence
        assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (str(first.StudyInstanceUID), old.outputs[f"{role}_series"])
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.outputs[role] != new.outputs[role]
        assert dciodvfy_errors(layout.job_outbox(new.job_id) / f"{role}.dcm") == []
        assert "PredecessorDocumentsSequence" not in pydicom.dcmread(layout.job_outbox(old.job_id) / f"{role}.dcm")


# --- routing defaults follow what the rule says ---------------------------------------------------------

CT_IMAGE, ENHANCED_CT, LEGACY_CT = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"
MR_IMAGE, ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"
SEG, SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"


def _series(modality: str, sop_class: str, instances: int, frames: int = 0) -> SeriesRecord:
    return SeriesRecord(series_uid=SERIES, study_uid="1.2.3", modality=modality, sop_class_uid=sop_class,
                        instances=instances, frames=frames)


def _reason(record: SeriesRecord, **match) -> str:
    from pacsworker.scp.routing import match_reason

    [model] = Settings(models=[{"name": "m", **({"match": match} if match else {})}]).models
    return match_reason(record, model)


def test_a_rule_naming_mr_takes_mr_images_whole_and_multi_frame():
    """`match: {modalities: [MR]}` once kept the CT-only SOP class default: every MR series was skipped."""
    assert _reason(_series("MR", MR_IMAGE, 20), modalities=["MR"]) == ""
    # one enhanced instance of 96 frames is a volume of 96 images, not "1 instance, fewer than 10"
    assert _reason(_series("MR", ENHANCED_MR, 1, frames=96), modalities=["MR"]) == ""
    assert _reason(_series("MR", ENHANCED_MR, 1, frames=8), modalities=["MR"]) == \
        "1 instance(s), fewer than 10 images (8 frames)"
    # results and screenshots are not images to analyse unless asked for
    assert _reason(_series("MR", SEG, 1, frames=40), modalities=["MR"]).startswith(f"SOP class {SEG} not in")
    assert _reason(_series("MR", SEG, 1, frames=40), modalities=["MR"], sop_class_uids=[]) == ""


def test_the_default_ct_rule_routes_what_it_routed_and_enhanced_ct_volumes_too():
    for record in (_series("CT", CT_IMAGE, 12), _series("CT", ENHANCED_CT, 12), _series("CT", CT_IMAGE, 10)):
        assert _reason(record) == ""
    assert _reason(_series("CT", CT_IMAGE, 9)) == "9 instance(s), fewer than 10"
    assert _reason(_series("CT", SECONDARY_CAPTURE, 30)).startswith(f"SOP class {SECONDARY_CAPTURE} not in")
    assert _reason(_series("MR", MR_IMAGE, 30)) == "modality MR not in ['CT']"
    assert _reason(_series("CT", ENHANCED_CT, 1, frames=200)) == ""  # skipped as "1 instance" before
    assert _reason(_series("CT", LEGACY_CT, 3, frames=120)) == ""


def test_what_a_rule_leaves_out_is_filled_in_from_what_it_says():
    from pacsworker.config import MatchRule

    assert MatchRule().sop_class_uids == [CT_IMAGE, ENHANCED_CT, LEGACY_CT] and MatchRule().min_instances == 10
    radiographs = MatchRule(modalities=["dx", "CR"])
    assert radiographs.modalities == ["DX", "CR"] and radiographs.min_instances == 1  # a radiograph is one image
    assert "1.2.840.10008.5.1.4.1.1.1" in radiographs.sop_class_uids
    anything = MatchRule(modalities=[])
    assert CT_IMAGE in anything.sop_class_uids and MR_IMAGE in anything.sop_class_uids
    assert SEG not in anything.sop_class_uids and SECONDARY_CAPTURE not in anything.sop_class_uids
    assert anything.min_instances == 1
    assert MatchRule(modalities=["MR"], min_instances=3).min_instances == 3
    assert MatchRule(modalities=["SM"], sop_class_uids=[]).sop_class_uids == []
    with pytest.raises(ValueError, match="no default SOP classes for modality SM"):
        MatchRule(modalities=["SM"])
    # the filled-in rule reads back as itself (dumps, models list, rules test show it)
    assert MatchRule(**radiographs.model_dump()) == radiographs


def test_the_tracker_records_frames_for_routing(tmp_path):
    from pacsworker.scp.tracker import InstanceMeta, SeriesTracker

    layout = DataLayout(tmp_path / "data").create()
    tracker = SeriesTracker(layout, quiet_seconds=0.01)
    for n, frames in enumerate((96, 1)):
        tracker.observe(InstanceMeta(study_uid="1.2.3", series_uid=SERIES, sop_instance_uid=f"1.2.3.4.{n}",
                                     sop_class_uid=ENHANCED_MR, modality="MR", calling_aet="MR1", frames=frames))
    completed = []
    time.sleep(0.05)
    tracker.complete_due(completed.append)
    [record] = completed
    assert (record.instances, record.frames) == (2, 97)


def test_rules_test_routes_a_one_instance_enhanced_mr_and_shows_the_rule_applied(tmp_path, dicom_dir):
    import json
    import sys

    config = tmp_path / "c.yaml"
    config.write_text("models:\n  - {name: mr-any, match: {modalities: [MR]}}\n  - {name: ct-body}\n")
    series = dicom_dir / "mr06_siemens_prisma_xa30_t1_enhanced_multiframe"
    command = [sys.executable, "-m", "pacsworker", "rules", "test", str(series), "--config", str(config)]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert (row["instances"], row["images"], row["models"]) == (1, 96, ["mr-any"])
    shown = subprocess.run(command, capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "COLUMNS": "250"}).stdout
    for line in ("sop_class_uids: MR Image Storage, Enhanced MR Image Storage, Enhanced MR Color Image Storage",
                 "min_instances: 10 images", "body_parts: any"):
        assert line in shown
