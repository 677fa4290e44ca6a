"""A series with a missing slice: refused by default with where the gap is; processed at its true
slice positions by a model configured to take it, with the SEG on the real slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from conftest import pacsworker_run, write_config

MODELS = Path(__file__).parent / "models"
CT08_MISSING_SLICE = "ct08_siemens_missing_slice_4sl"
CODE = ["SCT", "272673000", "Bone"]


def _config(tmp_path: Path, **model) -> Path:
    bones = {"name": "bones", "kind": "python", "source": f"{MODELS / 'switchable.py'}:Switchable",
             "match": {"min_instances": 1},
             "outputs": {"bone": {"kind": "labelmap", "segments": [{"label": 1, "name": "Bone", "category": CODE,
                                                                     "type": CODE}]}}, **model}
    return write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")}, models=[bones])


def test_a_missing_slice_is_refused_by_default_with_where_it_is(dicom_dir, tmp_path):
    result = pacsworker_run(dicom_dir / CT08_MISSING_SLICE, tmp_path / "out", _config(tmp_path), "bones")
    assert result.returncode != 0
    said = " ".join((result.stdout + result.stderr).split())
    assert "irregular-spacing" in said and "missing slice" in said, said[-2000:]
    assert not (tmp_path / "out" / "seg.dcm").exists()


def test_a_model_that_takes_irregular_series_gets_the_true_positions(dicom_dir, tmp_path):
    result = pacsworker_run(dicom_dir / CT08_MISSING_SLICE, tmp_path / "out",
                            _config(tmp_path, irregular_spacing="process", options={"threshold": -900}), "bones")
    assert result.returncode == 0, result.stderr[-3000:]
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    sources = {}
    for path in (dicom_dir / CT08_MISSING_SLICE).glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = [float(v) for v in ds.ImagePositionPatient]
    frames = seg.PerFrameFunctionalGroupsSequence
    assert frames
    for frame in frames:  # each frame on the slice it was derived from, at that slice's own position
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, sources[ref], atol=1e-3)


def test_undecodable_pixel_data_fails_the_job_naming_the_instance(dicom_dir, tmp_path):
    """A corrupt JPEG stream in one instance: the reason names it and the codec's complaint."""
    study = tmp_path / "study"
    study.mkdir()
    files = sorted((dicom_dir / "mr13_siemens_trio_4sl_jpeg_lossless").glob("*"))
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if index == 1:
            broken, data = str(ds.SOPInstanceUID), bytearray(ds.PixelData)
            middle = len(data) // 2  # the fragment items stay whole; the entropy-coded data does not
            data[middle:middle + 400] = b"\x00\xff" * 200
            ds.PixelData = bytes(data)
        ds.save_as(study / f"{index}.dcm")
    result = pacsworker_run(study, tmp_path / "out", _config(tmp_path), "bones")
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 4, said[-2000:]
    assert f"instance {broken} (JPEG Lossless" in said and "pixel data cannot be decoded" in said
    assert "Traceback" not in said
