"""Boxes, classes and scores: SR content highdicom reads back, on the images they belong to."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import dciodvfy_errors, pacsworker_run, write_config
from pacsworker.config import ModelSettings, OutputConfig
from pacsworker.worker.adapters.python_class import to_result
from pacsworker.worker.export import BOX_PALETTE, render_overlay
from pacsworker.worker.outputs import Box, ModelOutputError
from pacsworker.worker.series import Series
from pacsworker.worker.volume import load_series

MODELS = Path(__file__).parent / "models"
CT02 = "ct02_philips_ingenuity_headphantom_5mm"
BONE = ["SCT", "3138006", "Bone tissue"]
OUTPUTS = {
    "boxes": {"kind": "boxes", "values": {"Bone": BONE}},
    "bone_present": {"kind": "classification", "name": BONE,
                     "values": {"1": ["SCT", "52101004", "Present"], "0": ["SCT", "2667000", "Absent"]}},
    "bone_fraction": {"kind": "score", "name": ["SCT", "246262008", "Score"]},
}
MASK = {"mask": {"kind": "labelmap", "segments": [{"label": 1, "name": "Bone", "type": BONE}]}}


def _detector(mask: bool) -> ModelSettings:
    return ModelSettings(name="bones", kind="python", version="0.3", source=f"{MODELS / 'bone_detector.py'}:BoneDetector",
                         options={"mask": mask}, outputs={**OUTPUTS, **(MASK if mask else {})})


def _groups(ds: pydicom.Dataset):
    """Every TID 1501/1410/1411 measurement group container in the SR tree."""
    for item in ds.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
        if item.ValueType == "CONTAINER" and name == "125007":
            yield item
        else:
            yield from _groups(item)


def _text(group, code: str) -> str | None:
    for item in group.ContentSequence:
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == code:
            return str(item.TextValue)
    return None


@pytest.fixture(scope="module")
def detected(dicom_dir):
    from pacsworker.worker.runtime import run_model

    files = sorted((dicom_dir / CT02).glob("*.dcm"))
    return run_model(files, _detector(mask=True))


def test_boxes_are_planar_rois_on_the_image_they_were_found_on(detected, dicom_dir, tmp_path):
    assert detected.problems == [] and detected.seg is not None
    path = tmp_path / "image_sr.dcm"
    detected.image_sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    report = hd.sr.srread(path).content
    boxes = detected.values["boxes"]["boxes"]
    rois = report.get_planar_roi_measurement_groups()
    assert len(rois) == len(boxes) == 2 and all(len(g.roi.value) == 5 for g in rois)
    by_file = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in (dicom_dir / CT02).glob("*.dcm")}
    for box, roi in zip(boxes, rois):
        (c0, r0), (c1, r1) = box["top_left"], box["bottom_right"]
        assert roi.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert np.allclose(roi.roi.value, [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])
        assert roi.finding_type.value == "3138006" and str(roi.tracking_identifier).startswith("Bone")
        [probability] = roi.get_measurements()
        assert probability.name.meaning == "Probability" and probability.value == pytest.approx(box["score"])
        assert probability.unit.value == "1"
        # the referenced image (read on its own, not through the volume) has its bone in the box
        [uid] = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in roi.roi.ContentSequence]
        image = pydicom.dcmread(by_file[uid])
        hu = image.pixel_array * float(image.RescaleSlope) + float(image.RescaleIntercept)
        rows, columns = np.nonzero(hu >= 300)
        inside = (columns >= c0) & (columns < c1) & (rows >= r0) & (rows < r1)
        assert inside.mean() > 0.9, f"box on {uid} holds {inside.mean():.0%} of that image's bone"


def test_classes_and_scores_are_coded_with_their_scores(detected, tmp_path):
    path = tmp_path / "sr.dcm"
    detected.sr.save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path).content
    groups = report.get_image_measurement_groups()
    evaluations = [(q.name, q.value) for g in groups for q in g.get_qualitative_evaluations()]
    assert [(n.value, v.value, v.meaning) for n, v in evaluations] == [("3138006", "52101004", "Present")]
    measurements = {m.name.meaning: m for g in groups for m in g.get_measurements()}
    assert measurements["Probability"].value == pytest.approx(0.9)  # the class's score
    assert measurements["Score"].value == pytest.approx(detected.values["bone_fraction"]["value"], rel=1e-5)
    # algorithm name and version on every group: volume, class and score; long axis and boxes
    detected.image_sr.save_as(tmp_path / "image_sr.dcm", enforce_file_format=True)
    containers = list(_groups(pydicom.dcmread(path))) + list(_groups(pydicom.dcmread(tmp_path / "image_sr.dcm")))
    assert len(containers) == (1 + 1 + 1) + (1 + 2)
    assert all((_text(g, "111001"), _text(g, "111003")) == ("bones", "0.3") for g in containers)


def test_a_detector_alone_gives_an_sr_and_an_overlay_with_its_boxes(dicom_dir, tmp_path):
    models = [{"name": "bones", "kind": "python", "source": f"{MODELS / 'bone_detector.py'}:BoneDetector",
               "outputs": OUTPUTS}]
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")}, models=models)
    result = pacsworker_run(dicom_dir / CT02, tmp_path / "out", config, "bones")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert not (out / "seg.dcm").exists()
    assert pydicom.dcmread(out / "sr.dcm").SeriesDescription.startswith("bones findings of ")  # class, score
    assert pydicom.dcmread(out / "image_sr.dcm").SeriesDescription.startswith("bones boxes of ")
    assert dciodvfy_errors(out / "sr.dcm") == [] and dciodvfy_errors(out / "image_sr.dcm") == []
    boxes = json.loads((out / "outputs.json").read_text())["boxes"]["boxes"]
    best = max(boxes, key=lambda b: b["score"])
    (c0, r0), (c1, r1) = (int(v) for v in best["top_left"]), (int(v) for v in best["bottom_right"])
    # the summary, not the record: the boxes are counted, not listed
    said = " ".join(result.stdout.split())
    assert f"boxes boxes: 2 (Bone 2), best score {best['score']:.3g}" in said and "top_left" not in said, said
    assert "class bone_present (Bone tissue): 1 = Present, score 0.9" in said and str(out / "image_sr.dcm") in said
    with Image.open(out / "overlay.png") as png:
        rgb = np.asarray(png.convert("RGB"))
    series = Series(load_series(sorted((dicom_dir / CT02).glob("*.dcm"))))
    rendered, panels = render_overlay(series, None, [Box(slice=b["slice"], top_left=tuple(b["top_left"]),
                                                         bottom_right=tuple(b["bottom_right"]), label=b["label"],
                                                         score=b["score"]) for b in boxes])
    assert np.array_equal(rgb, np.asarray(rendered))
    # the axial plane (this CT's own) through the best box at full in-plane resolution: patient right
    # on the left and anterior up, as the images are stored; the outline sits on the box's edge pixels
    axial = panels[0]
    assert axial.name == "Axial" and axial.letters == ("A", "P", "R", "L")
    left, top = axial.box[:2]
    colour = np.array(BOX_PALETTE[0])
    for row, column in ((r0, (c0 + c1) // 2), (r1 - 1, (c0 + c1) // 2), ((r0 + r1) // 2, c0), ((r0 + r1) // 2, c1 - 1)):
        assert (rgb[top + row, left + column] == colour).all(), f"no box outline at row {row}, column {column}"
    assert not (rgb[top + (r0 + r1) // 2, left + (c0 + c1) // 2] == colour).all()


def test_malformed_boxes_name_what_is_wrong(dicom_dir):
    series = Series(load_series(sorted((dicom_dir / "ct06_ge_lightspeed_liver_3slice").glob("*.dcm"))))
    config = {"b": OutputConfig(kind="boxes")}
    good = {"slice": 0, "top_left": [10, 10], "bottom_right": [20, 30], "label": "Lesion", "score": 0.5}
    cases = [
        ({**good, "slice": 3}, r"box 2 is on slice 3; the series has 3"),  # the second of two
        ({**good, "bottom_right": [5, 30]}, r"box 1 from \(10.0, 10.0\) to \(5.0, 30.0\) is not a rectangle within the 512 x 512"),
        ({**good, "bottom_right": [20, 600]}, "not a rectangle within the 512 x 512 image"),
        ({k: v for k, v in good.items() if k != "top_left"}, "box 1 lacks 'top_left'"),
        ({**good, "score": 1.5}, "box 1 has score 1.5, outside 0..1"),
        ({**good, "top_left": [1, 2, 3]}, r"box 1 corners must be \[column, row\]"),
    ]
    for box, message in cases:
        with pytest.raises(ModelOutputError, match=message):
            to_result({"b": [good, box] if "slice" in box and box["slice"] == 3 else [box]}, config, series)
    result = to_result({"b": [good]}, config, series)
    assert result.outputs["b"].boxes[0].top_left == (10.0, 10.0)
