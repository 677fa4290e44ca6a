"""What operators read: JSON logs with a correlation id per series and job, a short start-up, and
no patient name, ID or birth date anywhere in the logs or records of an end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from conftest import SEG_CLASS, Pacsworker, free_port, port_open, storescu, wait_until, write_config
from pydicom.uid import generate_uid

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
NAME, PATIENT_ID, BIRTH_DATE = "Zebulon^Quattlebaum^Xavier", "PID-58213-QX", "19450317"
OTHER_ID = "ALT-99173-QX"
PHI = [NAME, "Zebulon", "Quattlebaum", PATIENT_ID, "58213", OTHER_ID, BIRTH_DATE, "1945-03-17", "17.03.1945"]


def _phi_study(source: Path, target: Path) -> tuple[str, str]:
    """ct02 as a new study of a patient with a name, IDs and a birth date; returns (study, series) UIDs."""
    target.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH_DATE
        ds.OtherPatientIDs = OTHER_ID
        ds.save_as(target / path.name, enforce_file_format=True)
    return study_uid, series_uid


def test_json_logs_of_an_end_to_end_run_carry_correlation_ids_and_no_phi(tmp_path, dicom_dir, orthanc):
    study_uid, series_uid = _phi_study(dicom_dir / CT02, tmp_path / "study")
    port = free_port()
    config = write_config(
        tmp_path / "c.yaml", scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 1},
        storage={"data_dir": str(tmp_path / "data")}, logging={"format": "json"},
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
    )
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, tmp_path / "study").returncode == 0
        wait_until(lambda: orthanc.instances_of_class(study_uid, SEG_CLASS), 120, what="the SEG in the PACS")
        wait_until(lambda: "delivered" in serve.output(), 30, what="the delivery to be logged")
        output = serve.output()
    finally:
        serve.stop()
    # the start-up says where it listens and what it runs, without Celery's banner
    start, _, rest = output.partition("\n  results to orthanc")
    assert f"DICOM      PACSWORKER on 127.0.0.1:{port}" in start and "model      ct-body (builtin)" in start
    assert "[config]" not in output and "SecurityWarning" not in output and "-------------- " not in output
    entries = []
    for line in rest.splitlines()[1:]:
        if line.strip():
            entries.append(json.loads(line))  # every log line is one JSON object
    assert {"time", "level", "logger", "process", "correlation", "message"} <= set(entries[0])
    about_series = [e for e in entries if series_uid in e["message"]]
    assert about_series and any(e["correlation"] == series_uid for e in about_series)
    jobs = {e["correlation"] for e in entries if e["correlation"].startswith(f"ct-body_{series_uid}_")}
    assert len(jobs) == 1, "the job's lines carry its id"
    [job_id] = jobs
    assert any(e["correlation"] == job_id and e["logger"] == "pacsworker.delivery" for e in entries)
    assert not [e for e in entries if e["level"] in ("WARNING", "ERROR")], "a clean run warns of nothing"
    # no patient name, ID or birth date in any log line or record pacsworker wrote
    written = [(tmp_path / "serve.log", output)] + [
        (path, path.read_text(errors="replace")) for path in (tmp_path / "data").rglob("*")
        if path.is_file() and (path.suffix in (".json", ".log", ".txt", ".sqlite3") or path.name.endswith("-wal"))
    ]  # the ledger's database (and its write-ahead log) too: state is kept there
    assert len(written) >= 3
    for path, text in written:
        for value in PHI:
            assert value.lower() not in text.lower(), f"{value!r} appears in {path}"


def _plain_lines(emit) -> list[str]:
    """What the plain-text handler of a pacsworker process writes while ``emit`` logs."""
    import io
    import logging

    from pacsworker.logs import configure_logging

    configure_logging("INFO", "plain")
    stream = io.StringIO()
    root = logging.getLogger()
    root.handlers[0].setStream(stream)
    try:
        emit()
    finally:
        configure_logging("WARNING", "plain")
    return stream.getvalue().splitlines()


def test_a_job_line_carries_the_job_id_once():
    import logging

    from pacsworker.logs import correlated

    job_id = f"ct-body_{generate_uid()}_0123456789abcdef_fedcba98"
    log = logging.getLogger("pacsworker.tasks")

    def emit():
        with correlated(job_id):
            log.info("job %s delivered to orthanc (2 instance(s) this attempt, 2 in all)", job_id)
            log.info("model ct-body loaded on cpu in 0.20 s")

    named, unnamed = _plain_lines(emit)
    assert named.count(job_id) == 1 and named.endswith(f"pacsworker.tasks: job {job_id} delivered to orthanc "
                                                       "(2 instance(s) this attempt, 2 in all)")
    assert unnamed.count(job_id) == 1 and f"pacsworker.tasks [{job_id}]: model ct-body loaded" in unnamed


def test_a_series_is_logged_complete_before_it_is_routed(tmp_path, caplog):
    import logging

    from pacsworker.records import DataLayout
    from pacsworker.scp.tracker import InstanceMeta, SeriesTracker

    caplog.set_level(logging.INFO)
    tracker = SeriesTracker(DataLayout(tmp_path / "data").create(), quiet_seconds=0)
    series_uid = generate_uid()
    for _ in range(3):
        tracker.observe(InstanceMeta(generate_uid(), series_uid, generate_uid(), "1.2.840.10008.5.1.4.1.1.2", "CT",
                                     "MODALITY"))
    routed = logging.getLogger("pacsworker.tasks")
    assert tracker.complete_due(lambda record: routed.info("series %s queued for ct-body", record.series_uid)) == 1
    lines = [r.getMessage() for r in caplog.records if series_uid in r.getMessage()]
    assert lines == [f"series {series_uid} complete (3 instances): quiet for 0 s", f"series {series_uid} queued for ct-body"]


def test_encoder_warnings_are_named_without_patient_values(dicom_dir, caplog):
    import logging

    import numpy as np

    from pacsworker.encoders import encode_results
    from pacsworker.worker.outputs import LabelMap, ModelIdentity, SegmentSpec
    from pacsworker.worker.volume import load_series

    volume = load_series(sorted((dicom_dir / "ct06_ge_lightspeed_liver_3slice").glob("*.dcm")))
    for ds in volume.source_datasets:
        ds.PatientName, ds.PatientID = "Quattlebaum", PATIENT_ID  # a one-component name: highdicom warns
    labels = np.zeros(volume.pixels.shape, dtype=np.uint8)
    labels[:, 10:20, 10:30] = 1
    caplog.set_level(logging.INFO, logger="pacsworker.encoders")
    encode_results(volume, LabelMap(labels, (SegmentSpec(1, "Box"),)), ModelIdentity("test", "1"))
    [line] = [r.getMessage() for r in caplog.records if "encoder warning" in r.getMessage()]
    assert "The string <PatientName> is unlikely to represent the intended person name since it contains only a " \
           "single component (UserWarning, " in line
    assert "Quattlebaum" not in line and PATIENT_ID not in line
