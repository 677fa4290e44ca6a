"""A job's inputs are fixed when it is made: the worker loads exactly those instances, and a job whose
instance is gone from the spool fails naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from conftest import ledger_of
from pydicom.uid import generate_uid

from pacsworker.config import Settings
from pacsworker.records import DataLayout, JobState, SeriesRecord
from pacsworker.tasks.app import configure
from pacsworker.tasks.jobs import process_series
from pacsworker.tasks.submit import submit_series

CT06 = "ct06_ge_lightspeed_liver_3slice"


def _settings(tmp_path: Path) -> Settings:
    settings = Settings(storage={"data_dir": str(tmp_path / "data")},
                        models=[{"name": "ct-body", "match": {"min_instances": 1}}])
    configure(settings)
    return settings


def _spool(layout: DataLayout, source: list[Path]) -> tuple[pydicom.Dataset, list[str]]:
    """The instances spooled as the receiver spools them (``<SOP Instance UID>.dcm``); their UIDs in order."""
    first = pydicom.dcmread(source[0], stop_before_pixels=True)
    spool = layout.series_dir(str(first.SeriesInstanceUID))
    spool.mkdir(parents=True, exist_ok=True)
    uids = []
    for path in source:
        uids.append(uid := str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        shutil.copy(path, spool / f"{uid}.dcm")
    return first, uids


def _complete(settings: Settings, first: pydicom.Dataset, uids: list[str]) -> str:
    """What the receiver does when the series is quiet: received, complete, routed. Returns the job made."""
    from pacsworker.scp.tracker import _facts, content_digest

    record = SeriesRecord(series_uid=str(first.SeriesInstanceUID), study_uid=str(first.StudyInstanceUID),
                          modality="CT", sop_class_uid=str(first.SOPClassUID), instances=len(uids),
                          content_digest=content_digest(set(uids)), sop_instance_uids=list(uids))
    ledger = ledger_of(settings.data_dir)
    ledger.record_instance(_facts(record), instances=record.instances)
    ledger.complete_series(record.series_uid, instances=record.instances, frames=0,
                           content_digest=record.content_digest, completed_by="test")
    submit_series(settings, record)
    [job] = ledger.jobs_of_series(record.series_uid)  # the series' current job
    return job.job_id


def _facts_of(first: pydicom.Dataset):
    """The series' facts as the receiver records them with each instance."""
    from pacsworker.scp.tracker import _facts

    return _facts(SeriesRecord(series_uid=str(first.SeriesInstanceUID), study_uid=str(first.StudyInstanceUID),
                               modality="CT", sop_class_uid=str(first.SOPClassUID)))


def _next_slice(layout: DataLayout, last: Path) -> str:
    """One more slice after ``last`` (a new instance, one slice spacing further), spooled; its UID."""
    ds = pydicom.dcmread(last)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = int(ds.InstanceNumber) + 1
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) - 1.0]
    if "SliceLocation" in ds:
        ds.SliceLocation = float(ds.SliceLocation) - 1.0
    ds.save_as(layout.series_dir(str(ds.SeriesInstanceUID)) / f"{ds.SOPInstanceUID}.dcm")
    return str(ds.SOPInstanceUID)


def _segmented(layout: DataLayout, job_id: str) -> list[str]:
    """The source instances the job's SEG references: what its model ran on."""
    seg = pydicom.dcmread(layout.job_outbox(job_id) / "seg.dcm", stop_before_pixels=True)
    [series] = seg.ReferencedSeriesSequence
    return sorted(str(item.ReferencedSOPInstanceUID) for item in series.ReferencedInstanceSequence)


def test_instances_arriving_after_the_job_was_made_belong_to_the_next_job(tmp_path, dicom_dir):
    settings = _settings(tmp_path)
    layout = DataLayout(settings.data_dir).create()
    source = sorted((dicom_dir / CT06).glob("*.dcm"))
    first, uids = _spool(layout, source)
    job_id = _complete(settings, first, uids)
    ledger = ledger_of(settings.data_dir)
    assert ledger.job_inputs(job_id) == {str(first.SeriesInstanceUID): uids}

    # the sender sends one more slice before a worker takes the job: it lands in the same spool folder
    later = _next_slice(layout, source[-1])
    ledger.record_instance(_facts_of(first), instances=len(uids) + 1)
    assert len(list(layout.series_dir(str(first.SeriesInstanceUID)).glob("*.dcm"))) == 4

    assert process_series(job_id) == JobState.DELIVERING.value
    assert _segmented(layout, job_id) == sorted(uids), "the job runs on the instances it was made for, no more"
    assert ledger.job_inputs(job_id) == {str(first.SeriesInstanceUID): uids}

    # the series completes again with the later slice: a new job, made for all four, runs on all four
    following = _complete(settings, first, [*uids, later])
    assert following != job_id
    assert sorted(ledger.job_inputs(following)[str(first.SeriesInstanceUID)]) == sorted([*uids, later])
    assert process_series(following) == JobState.DELIVERING.value
    assert _segmented(layout, following) == sorted([*uids, later])


def test_a_missing_input_fails_the_job_naming_the_instance(tmp_path, dicom_dir):
    settings = _settings(tmp_path)
    layout = DataLayout(settings.data_dir).create()
    first, uids = _spool(layout, sorted((dicom_dir / CT06).glob("*.dcm")))
    job_id = _complete(settings, first, uids)
    # one instance the job was made for is removed (by hand, or a cleanup) before a worker takes it
    (layout.series_dir(str(first.SeriesInstanceUID)) / f"{uids[1]}.dcm").unlink()

    assert process_series(job_id) == JobState.FAILED.value
    job = ledger_of(settings.data_dir).job(job_id)
    assert job.state == JobState.FAILED
    assert f"instance {uids[1]} of series {first.SeriesInstanceUID} that the job was made for is missing" in job.reason
    assert job.outputs == {} and not (layout.job_outbox(job_id) / "seg.dcm").exists()
    assert ledger_of(settings.data_dir).series(str(first.SeriesInstanceUID)).state == "failed"
