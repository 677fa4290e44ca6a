"""Models that ask for the whole study: one job once every series is complete and the study is quiet."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from conftest import COMPREHENSIVE_3D_SR_CLASS as SR_CLASS
from conftest import SEG_CLASS, Pacsworker, free_port, ledger_of, port_open, status_json, storescu, wait_until, write_config
from pydicom.uid import generate_uid

from pacsworker.records import DataLayout

MODELS = Path(__file__).parent / "models"
CT02 = "ct02_philips_ingenuity_headphantom_5mm"
CT04 = "ct04_philips_ingenuity_headphantom_scout"
CODE = ["SCT", "272673000", "Bone"]
STUDY_QUIET = 3.0


def _copy(source: Path, target: Path, study_uid: str, description: str, number: int) -> str:
    """The source series as a new series of ``study_uid``; returns its Series Instance UID."""
    target.mkdir(parents=True)
    series_uid = generate_uid()
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription, ds.SeriesNumber = description, number
        ds.save_as(target / path.name, enforce_file_format=True)
    return series_uid


def test_a_study_model_runs_once_on_every_series_of_the_quiet_study(tmp_path, dicom_dir, orthanc):
    study = generate_uid()
    plain = _copy(dicom_dir / CT02, tmp_path / "plain", study, "Head 5mm", 2)
    bone = _copy(dicom_dir / CT02, tmp_path / "bone", study, "Head 5mm bone kernel", 3)
    scout = _copy(dicom_dir / CT04, tmp_path / "scout", study, "Scout", 1)
    model = {
        "name": "study-probe", "kind": "python", "scope": "study", "source": f"{MODELS / 'study_probe.py'}:StudyProbe",
        "options": {"target": "bone kernel"}, "match": {"modalities": ["CT"], "min_instances": 1},
        "outputs": {"bone": {"kind": "labelmap", "segments": [{"label": 1, "name": "Bone", "category": CODE, "type": CODE}]},
                    "volumes": {"kind": "score", "name": ["99TEST", "V", "Volumes given"]},
                    "not_volumes": {"kind": "score", "name": ["99TEST", "N", "Series not volumes"]}},
    }
    port = free_port()
    config = write_config(
        tmp_path / "c.yaml", scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 1,
                                  "study_quiet_seconds": STUDY_QUIET},
        storage={"data_dir": str(tmp_path / "data")}, models=[model],
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
    )
    layout = DataLayout(tmp_path / "data")
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        for folder in ("plain", "scout", "bone"):
            assert storescu(port, tmp_path / folder).returncode == 0
        wait_until(lambda: orthanc.instances_of_class(study, SEG_CLASS), 120, what="the study model's SEG in the PACS")
        ledger = ledger_of(layout.root)
        jobs = ledger.latest_jobs(100)
        assert len(jobs) == 1, f"one study job, not {[j.job_id for j in jobs]}"
        [job] = jobs
        inputs = ledger.job_inputs(job.job_id)
        assert sorted(inputs) == sorted([plain, bone, scout]) and job.study_uid == study and job.scope == "study"
        record = ledger.study(study)
        assert job.job_id.startswith(f"study-probe_study_{study}_")
        assert not record.waiting and sorted(record.members) == sorted(inputs)
        assert all([j.job_id for j in ledger.jobs_of_series(uid)] == [job.job_id] for uid in inputs)
        series = {uid: ledger.series(uid) for uid in (plain, bone, scout)}
        # the job was made only once the study had been quiet after its last series
        assert job.queued_at - max(r.last_seen for r in series.values()) >= STUDY_QUIET
        # the SEG is on the series the model chose, and it was told what it was given
        [item] = orthanc.instances_of_class(study, SEG_CLASS)
        seg = orthanc.retrieve(study, item["0020000E"]["Value"][0], item["00080018"]["Value"][0])
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == bone
        values = ledger.job(job.job_id).values
        assert values["volumes"]["value"] == 2 and values["not_volumes"]["value"] == 1, values
        wait_until(lambda: all(ledger.series(uid).state == "done"
                               and [j.job_id for j in ledger.jobs_of_series(uid)] == [job.job_id] for uid in series),
                   30, what="every series done by the study job")
        assert status_json(config)["jobs"] == {"done": 1}

        # a series arriving later re-opens the study: the model runs again on all four, and its
        # results get new UIDs (the same bone series, other inputs), the SRs naming their predecessors
        first_srs = {item["00080018"]["Value"][0] for item in orthanc.instances_of_class(study, SR_CLASS)}
        late = _copy(dicom_dir / CT02, tmp_path / "late", study, "Head 5mm late", 4)
        assert storescu(port, tmp_path / "late").returncode == 0
        wait_until(lambda: len(orthanc.instances_of_class(study, SEG_CLASS)) == 2, 120, what="the re-run's SEG")
        [rerun] = [j for j in ledger.latest_jobs(100) if j.job_id != job.job_id]
        assert sorted(ledger.job_inputs(rerun.job_id)) == sorted([plain, bone, scout, late])
        wait_until(lambda: len(orthanc.instances_of_class(study, SR_CLASS)) == 2 * len(first_srs), 60,
                   what="the re-run's SRs")
        successors = []
        for item in orthanc.instances_of_class(study, SR_CLASS):
            if item["00080018"]["Value"][0] in first_srs:
                continue
            sr = orthanc.retrieve(study, item["0020000E"]["Value"][0], item["00080018"]["Value"][0])
            successors.append({ref.ReferencedSOPInstanceUID for series in sr.PredecessorDocumentsSequence[0]
                               .ReferencedSeriesSequence for ref in series.ReferencedSOPSequence})
        assert len(successors) == len(first_srs) and set().union(*successors) == first_srs
    finally:
        serve.stop()
