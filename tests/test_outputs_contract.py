"""The research-facing output contract: what a model returns is coded as configured, checked, and
documented as the code declares it (docs/reference/model-api.md is generated from it)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from conftest import pacsworker_run, write_config
from pacsworker.config import ModelSettings, OutputConfig
from pacsworker.worker import outputs as output_module
from pacsworker.worker.adapters.python_class import PythonModel, import_class, to_result
from pacsworker.worker.outputs import (
    Box,
    Boxes,
    Classification,
    CodedTerm,
    LabelMap,
    ModelOutputError,
    Score,
)
from pacsworker.worker.series import Series
from pacsworker.worker.volume import load_series

CT06 = "ct06_ge_lightspeed_liver_3slice"
BONE = ["SCT", "3138006", "Bone tissue"]
PRESENT = ["SCT", "52101004", "Present"]
PROBABILITY_OF_CANCER = ["DCM", "111047", "Probability of cancer"]
OUTPUTS = {
    "boxes": {"kind": "boxes", "values": {"Bone": BONE}},
    "bone_present": {"kind": "classification", "name": BONE, "values": {"1": PRESENT}},
    "risk": {"kind": "score", "name": PROBABILITY_OF_CANCER},
}
TYPED_MODEL = '''
from pacsworker.worker.outputs import Box, Boxes, Classification, CodedTerm, Score

UNCODED = CodedTerm(scheme="99MINE", value="x", meaning="my own words")


class Typed:
    version = "1"

    def __init__(self, class_score=0.8, risk=0.4):
        self.class_score, self.risk = class_score, risk

    def predict(self, series):
        return {
            "boxes": Boxes((Box(slice=1, top_left=(100, 100), bottom_right=(140, 130), label="Bone", score=0.7),)),
            "bone_present": Classification(1, UNCODED, score=self.class_score),
            "risk": Score(self.risk, UNCODED),
        }
'''


@pytest.fixture(scope="module")
def ct06(dicom_dir) -> Series:
    return Series(load_series(sorted((dicom_dir / CT06).glob("*.dcm"))))


def _typed_settings(tmp_path: Path, **options) -> ModelSettings:
    (tmp_path / "typed.py").write_text(TYPED_MODEL)
    return ModelSettings(name="typed", kind="python", source=f"{tmp_path / 'typed.py'}:Typed", options=options,
                         outputs=OUTPUTS)


def _codes(ds: pydicom.Dataset) -> set[tuple[str, str]]:
    """Every (scheme, value) coded anywhere in a dataset."""
    found = set()
    for element in ds.iterall():
        if element.VR == "SQ":
            for item in element.value:
                if "CodingSchemeDesignator" in item:
                    found.add((str(item.CodingSchemeDesignator), str(item.CodeValue)))
    return found


def test_typed_outputs_are_coded_as_configured(ct06, tmp_path, dicom_dir):
    from pacsworker.worker.runtime import run_model

    outcome = run_model(sorted((dicom_dir / CT06).glob("*.dcm")), _typed_settings(tmp_path))
    assert outcome.problems == []
    codes = _codes(outcome.sr) | _codes(outcome.image_sr)
    assert not [code for code in codes if code[0] in ("99PACSWORKER", "99MINE")], codes
    report = hd.sr.srread(_saved(outcome.sr, tmp_path / "sr.dcm")).content
    [group] = [g for g in report.get_image_measurement_groups() if g.get_qualitative_evaluations()]
    [evaluation] = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.value.value, evaluation.value.meaning) == ("3138006", "52101004", "Present")
    [risk] = [m for g in report.get_image_measurement_groups() for m in g.get_measurements()
              if m.name.value == "111047"]
    assert risk.value == pytest.approx(0.4)
    boxes = hd.sr.srread(_saved(outcome.image_sr, tmp_path / "image_sr.dcm")).content
    [roi] = boxes.get_planar_roi_measurement_groups()
    assert (roi.finding_type.scheme_designator, roi.finding_type.value) == ("SCT", "3138006")


def _saved(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_one_typed_output_takes_its_keys_coding_and_a_wrong_kind_is_refused(ct06):
    config = {"finding": OutputConfig(kind="classification", name=BONE, values={"1": PRESENT})}
    uncoded = CodedTerm(scheme="99MINE", value="x", meaning="mine")
    result = to_result(Classification(np.int64(1), uncoded), config, ct06)  # as np.argmax gives it
    assert result.outputs["finding"].value == 1 and type(result.outputs["finding"].value) is int
    assert result.outputs["finding"].name == CodedTerm.from_triple(BONE)
    assert result.outputs["finding"].meaning == CodedTerm.from_triple(PRESENT)
    with pytest.raises(ModelOutputError, match="output 'finding' is configured as classification, the model returned a Sc"):
        to_result({"finding": Score(0.5, uncoded)}, config, ct06)
    # a Box list under a boxes key gets the labels' codes too
    boxes = to_result({"b": [Box(slice=0, top_left=(1, 1), bottom_right=(5, 5), label="Bone")]},
                      {"b": OutputConfig(kind="boxes", values={"Bone": BONE})}, ct06)
    assert boxes.outputs["b"].boxes[0].finding == CodedTerm.from_triple(BONE)


@pytest.mark.parametrize("returned, message", [
    ({"c": {"value": 1, "score": 1.3}}, r"output 'c': classification score 1.3 lies outside 0..1"),
    ({"c": Classification(1, CodedTerm.from_triple(BONE), score=1.3)}, r"output 'c': classification score 1.3"),
    ({"c": Classification(1, CodedTerm.from_triple(BONE), score=-0.1)}, r"output 'c': classification score -0.1"),
    ({"risk": 7.5}, r"output 'risk': 7.5 is named 'Probability of cancer' \(DCM 111047\), a probability, but lies outside"),
    ({"risk": Score(7.5, CodedTerm.from_triple(BONE))}, r"output 'risk': 7.5 is named 'Probability of cancer'"),
    ({"other": Score(1.5, CodedTerm(scheme="DCM", value="122157", meaning="Probability"))}, r"output 'other': 1.5"),
    ({"risk": float("nan")}, r"output 'risk': a score is nan, not a finite number"),
])
def test_a_probability_outside_0_to_1_fails_naming_output_and_value(ct06, returned, message):
    config = {"c": OutputConfig(kind="classification", name=BONE),
              "risk": OutputConfig(kind="score", name=PROBABILITY_OF_CANCER)}
    config = {key: value for key, value in config.items() if key in returned}
    with pytest.raises(ModelOutputError, match=message):
        to_result(returned, config, ct06)


def test_scores_that_are_no_probabilities_may_exceed_1(ct06):
    config = {"volume_ratio": OutputConfig(kind="score", name=["SCT", "246262008", "Score"])}
    assert to_result({"volume_ratio": 7.5}, config, ct06).outputs["volume_ratio"].value == 7.5


def test_a_job_with_a_probability_outside_0_to_1_fails(tmp_path, dicom_dir):
    from pacsworker.worker.runtime import run_model

    with pytest.raises(ModelOutputError, match="output 'bone_present': classification score 1.3"):
        run_model(sorted((dicom_dir / CT06).glob("*.dcm")), _typed_settings(tmp_path, class_score=1.3))


def test_coded_term_takes_keywords_in_the_configurations_order():
    term = CodedTerm(scheme="SCT", value="39607008", meaning="Lung")
    assert term == CodedTerm.from_triple(["SCT", "39607008", "Lung"]) and term.as_json() == ["SCT", "39607008", "Lung"]
    with pytest.raises(TypeError, match="takes keywords only"):
        CodedTerm("39607008", "SCT", "Lung")  # the order of earlier versions: never silently another concept


def test_a_box_takes_slice_as_its_dict_does_and_slice_index_as_an_alias(ct06):
    box = Box(slice=2, top_left=(1, 1), bottom_right=(5, 5), label="x")
    assert box == Box(slice_index=2, top_left=(1, 1), bottom_right=(5, 5), label="x") and box.slice_index == 2
    with pytest.raises(TypeError, match="not both"):
        Box(2, (1, 1), (5, 5), "x", slice_index=2)
    config = {"b": OutputConfig(kind="boxes")}
    corners = {"top_left": [1, 1], "bottom_right": [5, 5], "label": "x"}
    for key in ("slice", "slice_index"):
        assert to_result({"b": [{key: 2, **corners}]}, config, ct06).outputs["b"].boxes[0] == box
    with pytest.raises(ModelOutputError, match="box 1 gives both 'slice' and 'slice_index'"):
        to_result({"b": [{"slice": 2, "slice_index": 1, **corners}]}, config, ct06)
    assert to_result({"b": [box]}, config, ct06).values_json()["b"]["boxes"][0]["slice"] == 2


def test_a_model_file_imports_the_modules_beside_it(tmp_path):
    for name, answer in (("one", 1), ("two", 2)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "helper.py").write_text(f"ANSWER = {answer}\n")
        (folder / "model.py").write_text(textwrap.dedent("""
            import helper
            from . import helper as relative

            class Model:
                def answers(self):
                    return helper.ANSWER, relative.ANSWER
        """))
    one, two = import_class(f"{tmp_path / 'one' / 'model.py'}:Model"), import_class(f"{tmp_path / 'two' / 'model.py'}:Model")
    # each folder's own helper, though both are called helper
    assert one().answers() == (1, 1) and two().answers() == (2, 2)


def test_without_a_version_the_results_name_the_models_file_digest(tmp_path):
    (tmp_path / "plain.py").write_text("class Plain:\n    def predict(self, series):\n        return None\n")
    source = f"{tmp_path / 'plain.py'}:Plain"
    model = PythonModel(ModelSettings(name="plain", kind="python", source=source), source)
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", model.identity.version)
    versioned = ModelSettings(name="plain", kind="python", version="2.1", source=f"{tmp_path / 'plain.py'}:Plain")
    assert PythonModel(versioned, versioned.source).identity.version == "2.1"


class _Bright(torch.nn.Module):
    """A network in one line: two channels, background and above 0.55 (100 HU after the window below)."""

    def forward(self, x):
        bright = (x > 0.55).float()
        return torch.cat([1 - bright, bright], 1)


def test_a_torchscript_run_writes_outputs_json_and_its_file_digest_as_version(dicom_dir, tmp_path):
    source = tmp_path / "model.ts"  # the usual name, which once became the results' version
    torch.jit.script(_Bright()).save(str(source))
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")}, models=[{
        "name": "bright", "kind": "torchscript", "source": str(source), "device": "cpu",
        "pipeline": {"pre": [{"name": "ScaleIntensityRanged",
                              "args": {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True}}],
                     "post": [{"name": "AsDiscreted", "args": {"argmax": True}}]},
        "outputs": {"seg": {"kind": "labelmap", "segments": [{"label": 1, "name": "Dense", "type": BONE}]}},
    }])
    out = tmp_path / "out"
    result = pacsworker_run(dicom_dir / CT06, out, config, "bright")
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads((out / "outputs.json").read_text())
    assert values["seg"]["kind"] == "labelmap" and values["seg"]["segments"]["Dense"]["voxels"] > 0
    seg = pydicom.dcmread(out / "seg.dcm")
    version = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", version), version
    versions = {str(item.TextValue) for item in _content_items(pydicom.dcmread(out / "sr.dcm"))
                if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111003"}  # Algorithm Version
    assert versions == {version}
    # the summary, not the record: a line per segment with its volume, and the files written
    said = result.stdout
    assert re.search(r"segment Dense: [0-9.]+ mL \([0-9]+ voxels\)", said), said
    assert str(out / "outputs.json") in " ".join(said.split()) and '"kind"' not in said


def test_ct_body_types_the_body_as_entire_body(dicom_dir):
    from pacsworker.worker.ct_body import CtBodyModel
    from pacsworker.worker.runtime import run_model

    body = CtBodyModel.segments[0]
    assert body.property_type == CodedTerm(scheme="SCT", value="38266002", meaning="Entire body")
    settings = ModelSettings(name="ct-body", kind="builtin", source="ct-body")
    outcome = run_model(sorted((dicom_dir / CT06).glob("*.dcm")), settings)
    findings = {(ds.Modality, str(item.ConceptCodeSequence[0].CodeMeaning))
                for ds in (outcome.sr, outcome.image_sr) for item in _content_items(ds)
                if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "121071"}  # Finding
    assert ("SR", "Entire body") in findings and ("SR", "Anatomical Structure") not in findings, findings
    assert outcome.image_sr is not None and any(meaning == "Entire body" for _, meaning in findings)


def _content_items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_label_maps_are_summarised_in_the_values(ct06):
    labels = np.zeros(ct06.pixels.shape, dtype=np.uint8)
    labels[0, :2, :3] = 1
    spec = output_module.SegmentSpec(1, "Spot")
    values = output_module.ModelResult({"m": LabelMap(labels, (spec,)), "n": Boxes(())}).values_json()
    assert values["m"] == {"kind": "labelmap", "shape": list(labels.shape), "segments": {"Spot": {"label": 1, "voxels": 6}}}
