"""The built-in mr-brain (deepbet) through serve, and routing: only 3D T1 head MR goes to it."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest
from conftest import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    Pacsworker,
    dciodvfy_errors,
    free_port,
    pacsworker_run,
    port_open,
    status_json,
    storescu,
    wait_until,
    write_config,
)
from phantom import write_cylinder_series
from test_end_to_end import _sr_volumes

from pacsworker.config import MatchRule, ModelSettings, brain_extra_installed
from pacsworker.records import SeriesRecord
from pacsworker.scp.routing import match_reason, plane_orientation

MR06 = "mr06_siemens_prisma_xa30_t1_enhanced_multiframe"
MR05 = "mr05_ge_signa_hdxt_prostate_adc"
CT02 = "ct02_philips_ingenuity_headphantom_5mm"


def test_rules_test_names_the_model_or_the_rule_that_failed(dicom_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")})
    result = subprocess.run(
        [sys.executable, "-m", "pacsworker", "rules", "test", str(dicom_dir / MR05), str(dicom_dir / MR06),
         str(dicom_dir / CT02), "--json", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["description"]: row for row in json.loads(result.stdout)}
    assert rows["anat-T1w_acq-tfl"]["models"] == ["mr-brain"]
    assert rows["STD BRAIN 5MM"]["models"] == ["ct-body"]
    adc = rows["Apparent Diffusion Coefficient (mm?/s)"]
    assert adc["models"] == [] and adc["instances"] == 20
    assert adc["not"]["mr-brain"] == "body part PROSTATE not in ['BRAIN', 'HEAD']"
    assert adc["not"]["ct-body"] == "modality MR not in ['CT']"


def _record(**facts) -> SeriesRecord:
    base = {"series_uid": "1.2.3", "study_uid": "1.2", "modality": "MR", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
            "instances": 120, "body_part": "HEAD", "mr_acquisition_type": "3D", "image_type": ["ORIGINAL", "PRIMARY"],
            "series_description": "t1_mprage_sag", "orientation": "sagittal"}
    return SeriesRecord(**{**base, **facts})


def test_every_rule_says_why_it_failed():
    brain = next(m for m in [ModelSettings(name="mr-brain", kind="builtin", source="mr-brain",
                                           match=MatchRule(**_brain_rule()))])
    assert match_reason(_record(), brain) == ""
    assert match_reason(_record(mr_acquisition_type="2D"), brain) == "MR acquisition type 2D not in ['3D']"
    assert match_reason(_record(series_description="t2_space_sag"), brain).startswith("series description 't2_space_sag' matches the exclusion")
    assert match_reason(_record(image_type=["DERIVED", "SECONDARY"]), brain) == "image type ['DERIVED', 'SECONDARY'] lacks ['ORIGINAL']"
    axial_only = ModelSettings(name="axial", match=MatchRule(modalities=["MR"], sop_class_uids=[], orientations=["axial"],
                                                             min_instances=1, max_instances=100, series_description="(?i)t1"))
    assert match_reason(_record(), axial_only) == "orientation sagittal not in ['axial']"
    assert match_reason(_record(orientation="axial"), axial_only) == "120 instance(s), more than 100"
    assert match_reason(_record(orientation="axial", instances=50, series_description="dwi"), axial_only) == \
        "series description 'dwi' does not match '(?i)t1'"
    assert plane_orientation([1, 0, 0, 0, 1, 0]) == "axial"
    assert plane_orientation([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert plane_orientation([1, 0, 0, 0, 0, -1]) == "coronal"
    assert plane_orientation([1, 0, 0, 0, 0.7071, 0.7071]) == "oblique"


def _brain_rule() -> dict:
    from pacsworker.config import default_models

    models = {m.name: m for m in default_models()}
    if "mr-brain" in models:
        return models["mr-brain"].match.model_dump()
    return {"modalities": ["MR"], "body_parts": ["BRAIN", "HEAD"], "mr_acquisition_types": ["3D"], "image_type": ["ORIGINAL"],
            "min_instances": 1, "series_description_exclude": r"(?i)flair|t2|dwi|diff|adc|swi|tof|angio|perf|space|cube"}


def test_mr_brain_through_serve_into_orthanc(tmp_path, dicom_dir, orthanc):
    """mr06's brain reaches the PACS; a cylinder phantom whose headers say BRAIN is withheld."""
    if not brain_extra_installed():
        pytest.fail("the brain extra (deepbet) is part of the README's commands and must be installed")
    port = free_port()
    config = write_config(
        tmp_path / "pacsworker.yaml",
        scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 2},
        storage={"data_dir": str(tmp_path / "data")},
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
    )  # no models: the defaults, ct-body and mr-brain
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert "the defaults run (ct-body, mr-brain)" in serve.output()
        phantom = write_cylinder_series(tmp_path / "phantom")
        assert storescu(port, dicom_dir / MR06, dicom_dir / MR05, phantom).returncode == 0
        wait_until(lambda: status_json(config)["jobs"].get("done") and status_json(config)["jobs"].get("implausible"),
                   240, what="the mr-brain jobs: mr06 done, the phantom withheld")
        state = status_json(config)
        [reason] = state["implausible_jobs"].values()
        assert reason.startswith("implausible input: head_like: the foreground's intensity varies by 0.0"), reason
        phantom_header = pydicom.dcmread(next(phantom.glob("*.dcm")), stop_before_pixels=True)
        assert state["series_jobs"][str(phantom_header.SeriesInstanceUID)]["state"] == "implausible"
        assert orthanc.study_instances(str(phantom_header.StudyInstanceUID)) == [], "nothing of the phantom's may reach the PACS"
        mr05 = str(pydicom.dcmread(next((dicom_dir / MR05).glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        assert "mr-brain: body part PROSTATE not in ['BRAIN', 'HEAD']" in state["skipped_series"][mr05]
        study = str(pydicom.dcmread(next((dicom_dir / MR06).glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        [seg_item] = orthanc.instances_of_class(study, SEG_CLASS)
        [sr_item] = [i for i in orthanc.instances_of_class(study, COMPREHENSIVE_3D_SR_CLASS)
                     if "mr-brain measurements" in json.dumps(i.get("0008103E"))]
        seg = orthanc.retrieve(study, seg_item["0020000E"]["Value"][0], seg_item["00080018"]["Value"][0])
        sr = orthanc.retrieve(study, sr_item["0020000E"]["Value"][0], sr_item["00080018"]["Value"][0])
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Brain"]
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "12738006"
        [volume_ml] = _sr_volumes(sr).values()
        print(f"mr-brain on mr06: brain volume {volume_ml:.0f} mL")
        assert 1000 <= volume_ml <= 1800
        for name, ds in (("seg", seg), ("sr", sr)):
            path = tmp_path / f"{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert dciodvfy_errors(path) == []
    finally:
        serve.stop()


def _brain_config(tmp_path, dicom_dir, **case):
    return write_config(
        tmp_path / "checked.yaml",
        storage={"data_dir": str(tmp_path / "data")},
        models=[{"name": "mr-brain", "kind": "builtin", "source": "mr-brain",
                 "match": _brain_rule(), "tests": [{"input": str(dicom_dir / MR06), **case}]}],
    )


def test_models_test_checks_reference_cases_and_a_worker_refuses_a_failing_model(tmp_path, dicom_dir):
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "d")})
    run = pacsworker_run(dicom_dir / MR06, tmp_path / "ref", config, "mr-brain")
    assert run.returncode == 0, run.stderr[-2000:]
    good = _brain_config(tmp_path, dicom_dir, expected_mask=str(tmp_path / "ref" / "mask.nii.gz"), min_dice=0.98,
                         expected_volume_ml={"Brain": 1573}, volume_tolerance=0.02)
    passed = subprocess.run([sys.executable, "-m", "pacsworker", "models", "test", "mr-brain", str(dicom_dir / MR06),
                             "--config", str(good)], capture_output=True, text=True, timeout=300)
    assert passed.returncode == 0, passed.stdout + passed.stderr[-2000:]
    text = " ".join(passed.stdout.split())
    assert "pass: Dice 1.0000 (at least 0.98)" in text and "pass: Brain 15" in text
    assert "first run on" in text and "second run on" in text and "model_s" in text
    # a regression: the expected volume moved beyond the tolerance
    bad = _brain_config(tmp_path, dicom_dir, expected_volume_ml={"Brain": 1200}, volume_tolerance=0.02)
    failed = subprocess.run([sys.executable, "-m", "pacsworker", "models", "test", "mr-brain", "--config", str(bad)],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "FAIL: Brain" in " ".join(failed.stdout.split())
    worker = subprocess.run([sys.executable, "-m", "pacsworker", "worker", "--check-models", "--queues", "model.mr-brain",
                             "--config", str(bad)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = " ".join((worker.stdout + worker.stderr).split())
    assert worker.returncode == 2
    assert "model mr-brain failed its reference cases and is not served by this worker" in output
