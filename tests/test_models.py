"""Bring your own model: the python adapter's two contracts, output mapping, and research files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
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
from PIL import Image

from pacsworker.config import OutputConfig
from pacsworker.worker.adapters.python_class import to_result
from pacsworker.worker.outputs import ModelOutputError
from pacsworker.worker.series import Series, age_in_months
from pacsworker.worker.volume import load_series

MODELS = Path(__file__).parent / "models"
CT02 = "ct02_philips_ingenuity_headphantom_5mm"
PROBABILITY_OF_CANCER = ["DCM", "111047", "Probability of cancer"]


def _probe_config(tmp_path: Path, folder: Path, **options) -> Path:
    return write_config(
        tmp_path / "probe.yaml",
        storage={"data_dir": str(tmp_path / "data")},
        models=[{
            "name": "probe", "kind": "python", "source": f"{MODELS / 'header_probe.py'}:HeaderProbe",
            "options": {"folder": str(folder), **options},
            "outputs": {
                "mask": {"kind": "labelmap", "segments": [{"label": 1, "name": "Bright", "type": ["SCT", "3138006", "Bone tissue"]}]},
                "bright_fraction": {"kind": "score", "name": PROBABILITY_OF_CANCER},
            },
        }],
    )


@pytest.mark.parametrize("folder", [CT02, "mr05_ge_signa_hdxt_prostate_adc"])
def test_named_inputs_equal_what_the_headers_say(dicom_dir, tmp_path, folder):
    """The probe asserts every input against its own reading of the headers (signed MR, unsigned CT)."""
    result = pacsworker_run(dicom_dir / folder, tmp_path / "out", _probe_config(tmp_path, dicom_dir / folder), "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "Bright"
    values = json.loads((tmp_path / "out" / "outputs.json").read_text())
    assert values["bright_fraction"]["kind"] == "score" and 0.05 < values["bright_fraction"]["value"] < 0.2
    assert "'unmapped' is not in the model's outputs configuration; ignored" in result.stderr


def test_a_wrong_input_fails_the_run_with_the_models_words(dicom_dir, tmp_path):
    config = _probe_config(tmp_path, dicom_dir / CT02, expect_slope=2.0)
    result = pacsworker_run(dicom_dir / CT02, tmp_path / "out", config, "probe")
    assert result.returncode == 4
    stderr = " ".join(result.stderr.split())
    assert "AssertionError in model probe (header_probe.py, line " in stderr and "rescale_slope" in stderr


def test_age_from_patient_age_or_birth_date():
    ds = pydicom.Dataset()
    ds.PatientAge = "031Y"
    assert age_in_months(ds) == 372
    ds.PatientAge = "010W"
    assert age_in_months(ds) == 2
    del ds.PatientAge
    ds.StudyDate, ds.PatientBirthDate = "20220711", "19910815"
    assert age_in_months(ds) == 370  # 30 years 10 months, the day not yet reached
    ds.PatientBirthDate = ""
    assert age_in_months(ds) is None


@pytest.fixture(scope="module")
def ct06_series(dicom_dir) -> Series:
    return Series(load_series(sorted((dicom_dir / "ct06_ge_lightspeed_liver_3slice").glob("*.dcm"))))


def test_output_mapping_names_the_key_that_is_wrong(ct06_series):
    labelmap = OutputConfig(kind="labelmap", segments=[{"label": 1, "name": "Liver"}])
    probabilities = OutputConfig(kind="probabilities", segments=[{"label": 1, "name": "Lesion"}])
    score = OutputConfig(kind="score", name=PROBABILITY_OF_CANCER)
    shape = ct06_series.pixels.shape
    with pytest.raises(ModelOutputError, match=r"output 'seg': label map of shape \(2, 2\)"):
        to_result({"seg": np.zeros((2, 2))}, {"seg": labelmap}, ct06_series)
    with pytest.raises(ModelOutputError, match=r"output\(s\) \['seg'\] configured but missing"):
        to_result({"other": 1}, {"seg": labelmap}, ct06_series)
    with pytest.raises(ModelOutputError, match="output 'p': probabilities must lie within 0..1"):
        to_result({"p": np.full(shape, 2.0)}, {"p": probabilities}, ct06_series)
    with pytest.raises(ModelOutputError, match="output 'risk': a score must be one number"):
        to_result({"risk": [0.1, 0.2]}, {"risk": score}, ct06_series)
    result = to_result(
        {"seg": {ct06_series.series_uid: np.ones(shape)}, "p": np.full(shape, 0.25), "risk": np.float32(0.5)},
        {"seg": labelmap, "p": probabilities, "risk": score}, ct06_series,
    )
    assert result.label_maps[0].array.dtype == np.uint8 and result.outputs["p"].array.shape == (1, *shape)
    assert result.values_json()["risk"]["value"] == 0.5


def test_run_writes_nifti_and_an_overlay_for_researchers(dicom_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")})
    result = pacsworker_run(dicom_dir / CT02, tmp_path / "out", config, "ct-body")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    mask = nib.load(out / "mask.nii.gz")
    image = nib.load(out / "image.nii.gz")
    assert mask.shape == image.shape == (512, 512, 28)
    # the NIfTI grid is the DICOM grid: voxel (0, 0, 0) sits at the first slice's position, in RAS
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in (dicom_dir / CT02).glob("*.dcm")]
    first = min(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))
    lps = np.array([float(v) for v in first.ImagePositionPatient])
    assert np.allclose(mask.affine @ [0, 0, 0, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-3)
    seg = pydicom.dcmread(out / "seg.dcm")
    assert int(np.asarray(mask.dataobj).astype(bool).sum()) == int(seg.pixel_array.astype(bool).sum())
    with Image.open(out / "overlay.png") as png:
        assert png.width > png.height > 100


def test_native_model_and_a_broken_one_through_serve(tmp_path, dicom_dir, orthanc):
    """A 15-line predict() model delivers to the PACS; a detector's SR alone arrives too; a model
    that cannot load fails only its jobs."""
    port = free_port()
    config = write_config(
        tmp_path / "pacsworker.yaml",
        scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 2},
        storage={"data_dir": str(tmp_path / "data")},
        queue={"heartbeat_seconds": 1},
        models=[
            {"name": "dense", "kind": "python", "source": f"{MODELS / 'bright_native.py'}:BrightTissue",
             "options": {"threshold": 200}},
            {"name": "broken", "kind": "python", "source": f"{MODELS / 'no_such_file.py'}:Nothing"},
            {"name": "bones", "kind": "python", "source": f"{MODELS / 'bone_detector.py'}:BoneDetector",
             "outputs": {"boxes": {"kind": "boxes"}}},
        ],
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
    )
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, dicom_dir / CT02).returncode == 0
        wait_until(lambda: status_json(config)["jobs"].get("done", 0) >= 2 and status_json(config)["jobs"].get("failed"),
                   180, what="two jobs done, one failed")
        state = status_json(config)
        [reason] = state["failed_jobs"].values()
        assert "model broken (python" in reason and "failed to load" in reason and "does not exist" in reason
        study = str(pydicom.dcmread(next((dicom_dir / CT02).glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        segs = [i for i in orthanc.instances_of_class(study, SEG_CLASS)
                if "dense" in json.dumps(i.get("0008103E", {}))]
        assert len(segs) == 1, "the dense model's SEG must be in the PACS"
        seg = orthanc.retrieve(study, segs[0]["0020000E"]["Value"][0], segs[0]["00080018"]["Value"][0])
        assert seg.SegmentSequence[0].SegmentLabel == "Dense tissue"
        assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "dense"
        path = tmp_path / "dense-seg.dcm"
        seg.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        srs = [i for i in orthanc.instances_of_class(study, COMPREHENSIVE_3D_SR_CLASS)
               if "bones boxes" in json.dumps(i.get("0008103E", {}))]
        assert len(srs) == 1, "the detector's SR must be in the PACS"
        assert not [i for i in orthanc.instances_of_class(study, SEG_CLASS) if "bones" in json.dumps(i.get("0008103E", {}))]
        assert "Traceback" not in serve.output()
    finally:
        serve.stop()


def test_models_list_names_every_model_without_loading_it(tmp_path):
    config = write_config(
        tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")},
        models=[{"name": "ct-body"}, {"name": "probe", "kind": "python", "source": "/nowhere/x.py:Missing",
                                      "version": "2.1", "match": {"modalities": ["MR"], "body_parts": ["KNEE"]}}],
    )
    result = subprocess.run([sys.executable, "-m", "pacsworker", "models", "list", "--config", str(config)],
                            capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "COLUMNS": "250"})
    assert result.returncode == 0, result.stderr  # listing never imports a model (this one does not exist)
    rows, name = {}, ""
    for line in (line for line in result.stdout.splitlines() if line.count("│") > 5):
        name = line.split("│")[1].strip() or name  # a row's rule takes several lines
        rows[name] = rows.get(name, "") + line
    assert set(rows) >= {"ct-body", "probe"}
    assert "2.1" in rows["probe"] and "body_parts: KNEE" in rows["probe"] and "python" in rows["probe"]
    # the rule as it applies: what the modalities written imply is shown too
    assert "min_instances: 10 images" in rows["probe"] and "Enhanced MR" in rows["probe"]


def test_a_pipeline_may_live_in_its_own_yaml_file(tmp_path):
    from pacsworker.config import ModelSettings
    from pacsworker.worker.adapters.torchscript import load_pipeline

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("pre: [{name: ScaleIntensityRanged, args: {a_min: -57, a_max: 164, b_min: 0, b_max: 1}}]\n"
                        "inferer: {name: sliding_window, roi_size: [96, 96, 96]}\n")
    settings = ModelSettings(name="m", kind="torchscript", source=str(tmp_path / "model.ts"), pipeline="pipeline.yaml")
    loaded = load_pipeline(settings)  # relative to the model file
    assert loaded.pre[0].name == "ScaleIntensityRanged" and loaded.inferer["roi_size"] == [96, 96, 96]


PROBABILITIES = {"prob": {"kind": "probabilities", "segments": [
    {"label": 1, "name": "Soft tissue", "type": ["SCT", "87784001", "Soft tissue"], "color": [200, 120, 80]},
    {"label": 2, "name": "Bone", "type": ["SCT", "3138006", "Bone tissue"]}]}}


def _soft_tissue(**seg):
    from pacsworker.config import ModelSettings

    return ModelSettings(name="soft", kind="python", source=f"{MODELS / 'soft_tissue.py'}:SoftTissue",
                         outputs=PROBABILITIES, seg=seg)


def test_probabilities_become_a_fractional_seg_highdicom_reads_back(dicom_dir, tmp_path):
    import highdicom as hd
    from scipy.special import expit

    from pacsworker.worker.runtime import run_model

    files = sorted((dicom_dir / "ct06_ge_lightspeed_liver_3slice").glob("*.dcm"))
    outcome = run_model(files, _soft_tissue())
    seg = outcome.seg
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Soft tissue", "Bone"]
    assert list(seg.SegmentSequence[0].RecommendedDisplayCIELabValue) == list(
        hd.color.CIELabColor.from_rgb(200, 120, 80).value)
    path = tmp_path / "fractional.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    read = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path))
    volume = outcome.volume
    uids = [str(s.dataset.SOPInstanceUID) for s in volume.sources]
    stored = read.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                                rescale_fractional=False)
    hu = volume.pixels.astype(np.float32)
    soft = expit(hu / 30) * expit(-(hu - 200) / 30)
    bone = expit((hu - 250) / 40)
    expected = np.rint(np.stack([soft, bone], axis=-1) * 255)
    assert np.abs(stored.astype(np.int32) - expected).max() <= 1  # 8-bit probabilities, as written


def test_binarized_probabilities_and_labelmap_seg(dicom_dir, tmp_path):
    from pacsworker.config import ModelSettings
    from pacsworker.worker.runtime import run_model

    files = sorted((dicom_dir / "ct06_ge_lightspeed_liver_3slice").glob("*.dcm"))
    binary = run_model(files, _soft_tissue(probabilities_as="binary", threshold=0.5)).seg
    assert binary.SegmentationType == "BINARY"
    pixels = binary.pixel_array.reshape(int(binary.NumberOfFrames), binary.Rows, binary.Columns)
    # exclusive: no voxel in two segments (frames of different segments never overlap in position)
    positions = {}
    for frame, item in zip(pixels, binary.PerFrameFunctionalGroupsSequence):
        key = tuple(item.PlanePositionSequence[0].ImagePositionPatient)
        positions[key] = positions.get(key, 0) + frame.astype(int)
    assert max(int(v.max()) for v in positions.values()) == 1
    path = tmp_path / "binary.dcm"
    binary.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    # LABELMAP (opt-in): the Label Map Segmentation IOD, newer than the dciodvfy Debian ships
    import highdicom as hd

    outcome = run_model(files, ModelSettings(name="ct-body", seg={"labelmap_as": "labelmap"}))
    labelmap = outcome.seg
    assert labelmap.SegmentationType == "LABELMAP" and labelmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    read = hd.seg.Segmentation.from_dataset(labelmap)
    uids = [str(s.dataset.SOPInstanceUID) for s in outcome.volume.sources]
    numbers = {s.spec.label: s.segment_number for s in outcome.statistics}
    expected = np.vectorize(lambda v: numbers.get(int(v), 0))(outcome.label_map.array)
    got = read.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    assert np.array_equal(got, expected)
