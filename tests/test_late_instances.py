"""Instances that arrive after their series was processed: the series re-opens, the job runs again
on the whole series, and the new results supersede the old ones (new UIDs, SRs naming their
predecessors); never a silent partial result."""

from __future__ import annotations

import shutil

import pydicom
from conftest import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    Orthanc,
    Pacsworker,
    free_port,
    port_open,
    status_json,
    storescu,
    wait_until,
    write_config,
)

CT02 = "ct02_philips_ingenuity_headphantom_5mm"


def _referenced(ds) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for s in ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}


def test_late_instances_rerun_the_series_and_supersede_the_results(tmp_path, dicom_dir):
    # the first 20 slices along the patient axis, then the other 8: a volume each time
    files = sorted((dicom_dir / CT02).glob("*.dcm"),
                   key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    first, late = tmp_path / "first", tmp_path / "late"
    first.mkdir(), late.mkdir()
    for index, path in enumerate(files):
        shutil.copy(path, (first if index < 20 else late) / path.name)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc = Orthanc(tmp_path / "orthanc").start()  # a PACS of its own: it counts results
    port = free_port()
    config = write_config(
        tmp_path / "pacsworker.yaml",
        scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 2},
        storage={"data_dir": str(tmp_path / "data")},
        models=[{"name": "ct-body"}],
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
    )
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, first).returncode == 0
        wait_until(lambda: status_json(config)["jobs"].get("done") == 1, 120, what="the job on 20 instances")
        [old_seg] = orthanc.instances_of_class(study, SEG_CLASS)
        assert storescu(port, late).returncode == 0
        wait_until(lambda: status_json(config)["jobs"].get("done") == 2, 120, what="the job on all 28 instances")
        state = status_json(config)
        [series] = state["series_jobs"].values()
        assert series["state"] == "done" and len(series["jobs"]) == 1

        def retrieve(item):
            return orthanc.retrieve(study, item["0020000E"]["Value"][0], item["00080018"]["Value"][0])

        segs = [retrieve(i) for i in orthanc.instances_of_class(study, SEG_CLASS)]
        srs = [retrieve(i) for i in orthanc.instances_of_class(study, COMPREHENSIVE_3D_SR_CLASS)]
        assert len(segs) == 2 and len(srs) == 4
        old = next(s for s in segs if s.SOPInstanceUID == old_seg["00080018"]["Value"][0])
        new = next(s for s in segs if s.SOPInstanceUID != old.SOPInstanceUID)
        sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        assert len(_referenced(old)) == 20 and _referenced(new) == sources  # the whole series, not a part
        # each new SR names the old SR of its kind as its predecessor
        for kind in ("measurements", "lengths"):
            of_kind = [s for s in srs if f" {kind} of " in s.SeriesDescription]
            newer = [s for s in of_kind if "PredecessorDocumentsSequence" in s]
            [older] = [s for s in of_kind if "PredecessorDocumentsSequence" not in s]
            assert len(newer) == 1, kind
            reference = newer[0].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
            assert reference.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == older.SOPInstanceUID
        assert "Traceback" not in serve.output()
    finally:
        serve.stop()
        orthanc.stop()
