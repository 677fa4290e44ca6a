"""kind: arterys against a model server the tests run, speaking the Arterys inference protocol."""

from __future__ import annotations

import time

import numpy as np
import pytest
from arterys_server import ArterysServer, bone_probability
from conftest import dciodvfy_errors, free_port, pacsworker_run, write_config

from pacsworker.config import ModelSettings
from pacsworker.worker.adapters.arterys import ArterysModel
from pacsworker.worker.outputs import ModelOutputError, ModelRunError
from pacsworker.worker.runtime import run_model
from pacsworker.worker.series import Series
from pacsworker.worker.volume import load_series

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
CT06 = "ct06_ge_lightspeed_liver_3slice"


@pytest.fixture(scope="module")
def arterys():
    server = ArterysServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ct02(dicom_dir):
    files = sorted((dicom_dir / CT02).glob("*.dcm"))
    return files, load_series(files)


@pytest.fixture(scope="module")
def ct06(dicom_dir):
    files = sorted((dicom_dir / CT06).glob("*.dcm"))
    return files, load_series(files)


def _settings(url: str, **extra) -> ModelSettings:
    return ModelSettings(**{"name": "bone-server", "kind": "arterys", "url": url, "wait_seconds": 5, **extra})


def _expected(volume) -> np.ndarray:
    return np.rint(bone_probability(volume.pixels) * 255) / 255


@pytest.mark.parametrize("mode", ["mask3d", "mask2d"])
def test_probability_masks_land_on_the_series_grid(arterys, ct02, mode):
    """3D: the depth index is the slice order pacsworker sent; 2D: each mask names its image."""
    files, volume = ct02
    arterys.mode = mode
    result = ArterysModel(_settings(arterys.url)).run(Series(volume))
    [maps] = result.probability_maps
    assert [s.name for s in maps.segments] == ["Bone"]
    assert np.abs(maps.array[0] - _expected(volume)).max() <= 1 / 255 + 1e-6
    request = arterys.requests[-1]
    assert request["json"]["inference_command"] == "get-probability-mask"
    assert request["instances"] == 28 and request["kinds"][0] == "application/json"
    assert set(request["kinds"][1:]) == {"application/dicom"}


def test_a_fractional_seg_of_the_server_passes_the_gate(arterys, ct02, tmp_path):
    files, _ = ct02
    arterys.mode = "mask3d"
    outcome = run_model(files, _settings(arterys.url))
    assert outcome.problems == []
    assert outcome.seg.SegmentationType == "FRACTIONAL" and outcome.seg.SegmentSequence[0].SegmentLabel == "Bone"
    path = tmp_path / "seg.dcm"
    outcome.seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    binary = run_model(files, _settings(arterys.url, seg={"probabilities_as": "binary", "threshold": 0.5}))
    assert binary.seg.SegmentationType == "BINARY"
    assert int(binary.label_map.array.sum()) == int((_expected(outcome.volume) >= 0.5).sum())


def test_boxes_reference_the_image_they_name(arterys, ct02, dicom_dir, tmp_path):
    files, volume = ct02
    arterys.mode = "boxes"
    settings = _settings(arterys.url, inference_command="get-bounding-box-2d",
                         outputs={"boxes": {"kind": "boxes", "values": {"Bone": ["SCT", "3138006", "Bone tissue"]}}})
    result = ArterysModel(settings).run(Series(volume))
    boxes = result.outputs["boxes"].boxes
    assert len(boxes) == 28 and arterys.requests[-1]["json"]["inference_command"] == "get-bounding-box-2d"
    for box in boxes:
        rows, columns = np.nonzero(volume.pixels[box.slice_index] >= 300)  # that slice's bone, read by us
        assert box.top_left == (columns.min(), rows.min())
        assert box.bottom_right == (columns.max() + 1, rows.max() + 1)
        assert box.score == 0.75 and box.finding.value == "3138006"
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")},
                          models=[settings.model_dump(mode="json", exclude_none=True)])
    run = pacsworker_run(dicom_dir / CT02, tmp_path / "out", config, "bone-server")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (tmp_path / "out" / "seg.dcm").exists() and not (tmp_path / "out" / "sr.dcm").exists()
    assert dciodvfy_errors(tmp_path / "out" / "image_sr.dcm") == []  # boxes alone: the image SR


def test_a_numeric_label_mask_becomes_a_label_map(arterys, ct06):
    _, volume = ct06
    arterys.mode = "labels"
    result = ArterysModel(_settings(arterys.url)).run(Series(volume))
    [labels] = result.label_maps
    hu = volume.pixels
    assert np.array_equal(labels.array, np.where(hu >= 300, 1, np.where(hu >= -100, 2, 0)))
    assert [(s.label, s.name) for s in labels.segments] == [(1, "Bone"), (2, "Soft tissue")]


@pytest.mark.parametrize("mode, reason", [
    ("missing_part", "the model server's answer has 1 binary part(s) for 2 entries in 'parts'"),
    ("short_buffer", "the model server's part 1 (Bone) holds 785920 bytes; 3 x 512 x 512 uint8 is 786432"),
    ("unknown_uid", "the model server's box 1 names SOPInstanceUID 1.2.3.4.5.6.7.8.9, which is not an image of the series"),
    ("other_series", "the model server's part 1 is for series 1.2.3.999, not "),
])
def test_malformed_answers_fail_with_what_was_wrong(arterys, ct06, dicom_dir, tmp_path, mode, reason):
    files, _ = ct06
    arterys.mode = mode
    with pytest.raises(ModelOutputError) as raised:
        run_model(files, _settings(arterys.url))
    assert str(raised.value).startswith(reason)
    if mode == "short_buffer":  # as the job's reason and the CLI say it
        config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")},
                              models=[_settings(arterys.url).model_dump(mode="json", exclude_none=True)])
        run = pacsworker_run(dicom_dir / CT06, tmp_path / "out", config, "bone-server")
        assert run.returncode == 4 and reason in " ".join(run.stderr.split())


def test_the_server_is_waited_for(arterys, ct06):
    _, volume = ct06
    arterys.mode, arterys.healthchecks, arterys.ready_after = "mask3d", 0, 2
    try:
        started = time.monotonic()
        result = ArterysModel(_settings(arterys.url)).run(Series(volume))
        assert result.probability_maps and arterys.healthchecks == 3 and time.monotonic() - started >= 2
    finally:
        arterys.ready_after = 0
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelRunError, match=rf"Arterys model server at {down} not ready after 2 s: ConnectionError"):
        ArterysModel(_settings(down, wait_seconds=2)).run(Series(volume))
