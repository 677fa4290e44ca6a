"""Plausibility checks: results that make no sense are withheld, or delivered flagged, with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    Pacsworker,
    dciodvfy_errors,
    free_port,
    port_open,
    status_json,
    storescu,
    wait_until,
    write_config,
)
from phantom import write_cylinder_series
from pydantic import ValidationError

from pacsworker.config import MR_IMAGE_CLASSES, ModelSettings, ResultCheck
from pacsworker.worker.outputs import CodedTerm, LabelMap, ModelResult, Score
from pacsworker.worker.plausibility import result_failures
from pacsworker.worker.series import Series
from pacsworker.worker.volume import load_series

MR06 = "mr06_siemens_prisma_xa30_t1_enhanced_multiframe"
BRAIN_RULE = {"modalities": ["MR"], "sop_class_uids": MR_IMAGE_CLASSES, "body_parts": ["BRAIN", "HEAD"],
              "mr_acquisition_types": ["3D"], "min_instances": 1}


def _brain(**checks) -> dict:
    return {"name": "mr-brain", "kind": "builtin", "source": "mr-brain", "match": BRAIN_RULE, "checks": checks}


def test_flagged_results_are_delivered_and_name_the_failed_check(tmp_path, dicom_dir, orthanc):
    """mr06's 1.57 L brain against a bound the test tightens to 1 L, with on_fail: flag."""
    port = free_port()
    config = write_config(
        tmp_path / "pacsworker.yaml",
        scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 2},
        storage={"data_dir": str(tmp_path / "data")},
        models=[_brain(on_fail="flag", results=[{"segment": "Brain", "measure": "volume_ml", "max": 1000}])],
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
    )
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, dicom_dir / MR06).returncode == 0
        wait_until(lambda: status_json(config)["series"].get("done") or status_json(config)["series"].get("skipped"),
                   240, what="the flagged mr-brain job")
        state = status_json(config)
        [flag] = state["flagged_jobs"].values()
        assert flag.startswith("delivered flagged: Brain volume_ml is 157") and "above the maximum 1000 (any age)" in flag
        study = str(pydicom.dcmread(next((dicom_dir / MR06).glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        segs = [i for i in orthanc.instances_of_class(study, SEG_CLASS) if "[implausible]" in json.dumps(i.get("0008103E"))]
        srs = [i for i in orthanc.instances_of_class(study, COMPREHENSIVE_3D_SR_CLASS)
               if "measurements [implausible]" in json.dumps(i.get("0008103E"))]
        assert len(segs) == 1 and len(srs) == 1, "the flagged SEG and SR must be in the PACS"
        assert [i for i in orthanc.instances_of_class(study, COMPREHENSIVE_3D_SR_CLASS)
                if "lengths [implausible]" in json.dumps(i.get("0008103E"))], "the lengths are flagged too"
        seg = orthanc.retrieve(study, segs[0]["0020000E"]["Value"][0], segs[0]["00080018"]["Value"][0])
        assert seg.SeriesDescription.startswith("mr-brain SEG [implausible] of ")
        # a flagged result is another object than the unflagged one of the same model and series
        from pacsworker.config import ModelSettings
        from pacsworker.worker.runtime import run_model

        unflagged = run_model(sorted((dicom_dir / MR06).glob("*")), ModelSettings(name="mr-brain", kind="builtin",
                                                                                  source="mr-brain"))
        assert unflagged.implausible == [] and unflagged.seg.SOPInstanceUID != seg.SOPInstanceUID
        sr = orthanc.retrieve(study, srs[0]["0020000E"]["Value"][0], srs[0]["00080018"]["Value"][0])
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        report = hd.sr.srread(path).content
        evaluations = [(q.name.meaning, q.value.meaning) for g in report.get_image_measurement_groups()
                       for q in g.get_qualitative_evaluations()]
        [(name, meaning)] = evaluations
        assert name == "Plausibility check"
        assert meaning.startswith("Failed: Brain volume_ml is 157") and "above the maximum 1000" in meaning
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
    def series(age: str) -> Series:
        folder = write_cylinder_series(tmp_path_factory.mktemp("phantom"), age=age)
        return Series(load_series(sorted(folder.glob("*.dcm"))))
    return series


def _ball(series: Series, volume_ml: float) -> LabelMap:
    """A ball of about ``volume_ml`` in the series' grid, as a one-segment Brain label map."""
    from pacsworker.worker.mr_brain import BRAIN

    spacing = np.array(series.spacing)
    radius = (3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    grid = np.indices(series.pixels.shape).transpose(1, 2, 3, 0) * spacing
    centre = (np.array(series.pixels.shape) - 1) / 2 * spacing
    return LabelMap((np.linalg.norm(grid - centre, axis=-1) <= radius).astype(np.uint8), (BRAIN,))


def test_a_bound_that_depends_on_age(phantom_series):
    """mr-brain's defaults: at least 0.8 L from 2 years of age, at least 0.25 L at any age."""
    checks = ModelSettings(name="mr-brain", kind="builtin", source="mr-brain").effective_checks()
    adult, infant, unknown = phantom_series("030Y"), phantom_series("010M"), phantom_series("")
    assert (adult.patient_age_months, infant.patient_age_months, unknown.patient_age_months) == (360, 10, None)
    ball = ModelResult({"brain": _ball(adult, 700)})
    measured = float(ball.outputs["brain"].array.sum()) * float(np.prod(adult.spacing)) / 1000
    assert abs(measured - 700) < 20
    assert result_failures(ball, adult, checks) == [
        f"Brain volume_ml is {measured:.1f}, below the minimum 800 (age at least 24 months)"]
    assert result_failures(ball, infant, checks) == []
    assert result_failures(ball, unknown, checks) == []  # an age rule needs a known age
    tiny = ModelResult({"brain": _ball(infant, 100)})
    assert [f.split(" is ")[0] for f in result_failures(tiny, infant, checks)] == ["Brain volume_ml"]
    big = ModelResult({"brain": _ball(infant, 1800)})
    [failure] = result_failures(big, infant, checks)
    assert "above the maximum 1600 (age at most 12 months)" in failure


def test_components_fov_and_score_bounds(phantom_series):
    from pacsworker.config import PlausibilityChecks

    series = phantom_series("030Y")
    labels = np.zeros(series.pixels.shape, dtype=np.uint8)
    labels[10:14, 10:14, 10:14] = 1
    labels[30:34, 60:64, 60:64] = 1
    labels[40:44, 20:24, 70:74] = 1
    from pacsworker.worker.mr_brain import BRAIN

    result = ModelResult({"m": LabelMap(labels, (BRAIN,)), "risk": Score(1.7, CodedTerm(scheme="DCM", value="111047", meaning="Probability of cancer"))})
    checks = PlausibilityChecks(results=[
        ResultCheck(segment="Brain", measure="components", max=2),
        ResultCheck(segment="Brain", measure="fov_fraction", min=0.01),
        ResultCheck(output="risk", measure="value", max=1),
        ResultCheck(segment="Lesion", measure="volume_ml", max=5),
    ])
    failures = result_failures(result, series, checks)
    assert failures == [
        "Brain components is 3, above the maximum 2 (any age)",
        f"Brain fov_fraction is {192 / labels.size:.4g}, below the minimum 0.01 (any age)",
        "risk value is 1.7, above the maximum 1 (any age)",
        "Lesion volume_ml: the model returned no segment 'Lesion'",
    ]
    with pytest.raises(ValidationError, match="either a segment or a score output"):
        ResultCheck(segment="Brain", output="risk", measure="value", max=1)
    with pytest.raises(ValidationError, match="needs min, max or both"):
        ResultCheck(segment="Brain", measure="volume_ml")


def test_models_test_runs_the_checks(tmp_path, dicom_dir):
    phantom = write_cylinder_series(tmp_path / "phantom")
    config = write_config(
        tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")},
        models=[{**_brain(), "checks": None, "tests": [
            {"input": str(phantom), "implausible": True},
            {"input": str(dicom_dir / MR06), "expected_volume_ml": {"Brain": 1573}, "volume_tolerance": 0.02},
        ]}],
    )
    result = subprocess.run([sys.executable, "-m", "pacsworker", "models", "test", "mr-brain", "--config", str(config)],
                            capture_output=True, text=True, timeout=300)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0, text + result.stderr[-2000:]
    assert "pass: fails the plausibility checks, as expected: head_like" in text
    assert "pass: plausibility checks" in text and "pass: Brain 157" in text
    # the phantom without the expectation: the case fails, naming the check
    config.write_text(config.read_text().replace("implausible: true", "expected_volume_ml: {Brain: 1500}"))
    result = subprocess.run([sys.executable, "-m", "pacsworker", "models", "test", "mr-brain", "--config", str(config)],
                            capture_output=True, text=True, timeout=300)
    text = " ".join(result.stdout.split())
    assert result.returncode == 1 and "FAIL: plausibility: head_like: the foreground's intensity varies" in text
