"""A study sent by a real modality (DCMTK storescu) comes back to a real PACS (Orthanc) as SEG + SR.

Once with ``pacsworker serve`` on the embedded broker, once distributed on Redis with a worker
killed mid-job and the PACS down while results are pending.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    Orthanc,
    Pacsworker,
    dciodvfy_errors,
    free_port,
    ledger_of,
    port_open,
    status_json,
    storescu,
    wait_until,
    write_config,
)

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
CT04 = "ct04_philips_ingenuity_headphantom_scout"
SC01 = "sc01_philips_ingenuity_exam_summary"
STUDY = "1.3.46.670589.33.1.27492712521914879309.27169771283235650014"
CT02_SERIES = "1.3.46.670589.33.1.6002432791750815306.26862469513794233732"
CT04_SERIES = "1.3.46.670589.33.1.17491953482334658115.21841165151607525240"
SC01_SERIES = "1.3.46.670589.33.1.22100348011750129999.30936184503286111321"


def _config(tmp: Path, port: int, orthanc: Orthanc, database_url: str = "", **queue) -> Path:
    return write_config(
        tmp / "pacsworker.yaml",
        scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 2},
        storage={"data_dir": str(tmp / "data"), **({"database_url": database_url} if database_url else {})},
        queue={"heartbeat_seconds": 1, "stale_after_seconds": 6, "delivery_backoff_seconds": 1,
               "delivery_backoff_max_seconds": 3, **queue},
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
    )


def _results(orthanc: Orthanc) -> tuple[list[dict], list[dict]]:
    return orthanc.instances_of_class(STUDY, SEG_CLASS), orthanc.instances_of_class(STUDY, COMPREHENSIVE_3D_SR_CLASS)


def _uid(item: dict, tag: str) -> str:
    return item[tag]["Value"][0]


def check_results(orthanc: Orthanc, dicom_dir: Path, tmp: Path) -> tuple[str, list[str]]:
    """What a user checks in the PACS; returns the SEG's and the SRs' SOP Instance UIDs."""
    segs, srs = _results(orthanc)
    assert len(segs) == 1 and len(srs) == 2, f"expected one SEG and two SRs, found {len(segs)} and {len(srs)}"
    seg = orthanc.retrieve(STUDY, _uid(segs[0], "0020000E"), _uid(segs[0], "00080018"))
    reports = {str(ds.SeriesDescription).split(" ")[1]: ds for ds in (
        orthanc.retrieve(STUDY, _uid(item, "0020000E"), _uid(item, "00080018")) for item in srs)}
    assert set(reports) == {"measurements", "lengths"}, f"SR series {sorted(reports)}"
    sr, lengths = reports["measurements"], reports["lengths"]
    assert int(seg.SeriesNumber) + 1 == int(sr.SeriesNumber) == int(lengths.SeriesNumber) - 1
    for name, ds in (("seg", seg), ("sr", sr), ("image-sr", lengths)):
        path = tmp / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], f"dciodvfy reports errors on the {name}"
    sources = {}
    for path in (dicom_dir / CT02).glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = ds
    # result series are new series of the source study
    assert seg.StudyInstanceUID == STUDY and sr.StudyInstanceUID == STUDY
    assert seg.SeriesInstanceUID not in (CT02_SERIES, sr.SeriesInstanceUID)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == CT02_SERIES
    # every frame references a ct02 instance and sits at that instance's position
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in sources, f"frame references {ref}, not an instance of ct02"
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in sources[ref].ImagePositionPatient], atol=1e-3)
    # SR volumes equal SEG voxel counts x voxel volume, segment by segment
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    positions = sorted(
        np.dot([float(v) for v in s.ImagePositionPatient], np.cross(*np.reshape([float(v) for v in s.ImageOrientationPatient], (2, 3))))
        for s in sources.values()
    )
    voxel_ml = float(measures.PixelSpacing[0]) * float(measures.PixelSpacing[1]) * float(np.median(np.diff(positions))) / 1000
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    counts: dict[int, int] = {}
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(pixels[index].sum())
    report = _sr_volumes(sr)
    assert set(report) == set(counts) and counts, "the SR must report every SEG segment"
    for number, volume_ml in report.items():
        assert volume_ml == pytest.approx(counts[number] * voxel_ml, rel=1e-5)
    return str(seg.SOPInstanceUID), sorted(str(ds.SOPInstanceUID) for ds in reports.values())


def _sr_volumes(sr) -> dict[int, float]:
    """Segment number -> Volume (mL) from the TID 1500 measurement groups."""
    volumes = {}
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in item.ContentSequence:
            segment, volume = None, None
            for child in group.ContentSequence:
                code = child.ConceptNameCodeSequence[0].CodeValue
                if code == "121191":  # Referenced Segment
                    segment = int(child.ReferencedSOPSequence[0].ReferencedSegmentNumber)
                elif code == "118565006":  # Volume
                    volume = float(child.MeasuredValueSequence[0].NumericValue)
            if volume is not None:
                volumes[segment] = volume
    return volumes


def test_serve_embedded_study_to_orthanc(tmp_path, dicom_dir, orthanc):
    port = free_port()
    config = _config(tmp_path, port, orthanc)
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        sent = storescu(port, dicom_dir / CT02, dicom_dir / CT04, dicom_dir / SC01)
        assert sent.returncode == 0, sent.stderr
        started = time.time()
        wait_until(lambda: all(_results(orthanc)), 120, what="SEG and SR in Orthanc")
        print(f"results queryable {time.time() - started:.1f} s after the send ended")
        seg_uid, sr_uids = check_results(orthanc, dicom_dir, tmp_path)

        state = wait_until(lambda: (s := status_json(config))["series"].get("done") and s, 30, what="series done")
        assert state["jobs"] == {"done": 1}
        assert state["series"] == {"done": 1, "skipped": 2}  # how each series ended, not "queued" forever
        [job_id] = state["series_jobs"][CT02_SERIES]["jobs"]
        assert state["series_jobs"][CT02_SERIES]["state"] == "done" and job_id.startswith(f"ct-body_{CT02_SERIES}_")
        assert set(state["skipped_series"]) == {CT04_SERIES, SC01_SERIES}
        assert "fewer than 10" in state["skipped_series"][CT04_SERIES]
        assert "SOP class" in state["skipped_series"][SC01_SERIES]

        # the same study again: the same instances are the same job, so no new job runs
        assert storescu(port, dicom_dir / CT02, dicom_dir / CT04, dicom_dir / SC01).returncode == 0
        wait_until(lambda: f"job {job_id} (done) stands" in serve.output(), 60, what="the resend to be routed")
        wait_until(lambda: status_json(config)["series"] == {"done": 1, "skipped": 2}, 30, what="series settled")
        assert status_json(config)["jobs"] == {"done": 1}
        segs, srs = _results(orthanc)
        assert [_uid(i, "00080018") for i in segs] == [seg_uid]
        assert sorted(_uid(i, "00080018") for i in srs) == sr_uids
        output = serve.output()
        assert "Traceback" not in output
        assert "worker exited" not in output  # no worker crashed on the first start
        # kombu's control exchange lives under data_dir, not in the working directory
        assert not (tmp_path / "control").exists() and (tmp_path / "data" / "broker" / "control").is_dir()
    finally:
        serve.stop()


def test_distributed_redis_worker_killed_and_pacs_down(tmp_path, dicom_dir, redis_url, database_url):
    """Roles as on several hosts: Redis for the messages, the ledger in PostgreSQL."""
    orthanc = Orthanc(tmp_path / "orthanc")  # own PACS: it goes down during this test
    port = free_port()
    config = _config(tmp_path, port, orthanc, database_url=database_url, broker_url=redis_url)
    ledger = ledger_of(tmp_path / "data", database_url)
    receiver = Pacsworker(["scp"], config, tmp_path / "scp.log")
    first = second = None
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        first = Pacsworker(["worker", "--name", "first@%h"], config, tmp_path / "worker1.log")
        assert storescu(port, dicom_dir / CT02).returncode == 0

        def running_job():
            running = ledger.jobs_in_state("running", limit=1)
            return running and running[0].job_id

        job_id = wait_until(running_job, 120, interval=0.05, what="the job to start")
        first.kill()  # SIGKILL to the worker and its pool child, mid-job
        second = Pacsworker(["worker", "--name", "second@%h"], config, tmp_path / "worker2.log")
        # the PACS is down: the job finishes, the results wait in the outbox
        def failed_delivery():
            pending = status_json(config)["pending_deliveries"]
            return any(error for job in pending.values() for error in job.values())

        wait_until(failed_delivery, 120, what="a failed delivery attempt")
        assert ledger.job(job_id).attempts == 2, "the killed job must run again"
        orthanc.start()
        wait_until(lambda: all(_results(orthanc)), 120, what="delivery after the PACS came back")
        check_results(orthanc, dicom_dir, tmp_path)
        state = wait_until(lambda: (s := status_json(config))["series"] == {"done": 1} and s, 30, what="series done")
        assert state["jobs"] == {"done": 1} and state["pending_deliveries"] == {}
        assert "delivery failed" in second.output()
        assert not (tmp_path / "data" / "ledger.sqlite3").exists(), "every role keeps its state in PostgreSQL"
    finally:
        for proc in (receiver, first, second):
            if proc is not None:
                proc.stop()
        if orthanc.proc is not None:
            orthanc.stop()
