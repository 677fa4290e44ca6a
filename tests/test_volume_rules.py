"""Series -> volume geometry rules: irregular spacing (refused, or loaded when asked), 4D series
(refused with their layout), all planes at one position, and the headers the loader keeps."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pacsworker.worker.volume import NotAVolumeError, VolumeOutcome, load_series

MISSING_SLICE = "ct08_siemens_missing_slice_4sl"  # gaps 0.75, 0.75, 1.5 mm: one slice missing


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_irregular_spacing_is_refused_by_default_with_where_the_gap_is(dicom_dir):
    with pytest.raises(NotAVolumeError) as refused:
        load_series(_files(dicom_dir / MISSING_SLICE))
    assert refused.value.outcome is VolumeOutcome.IRREGULAR_SPACING
    reason = refused.value.reason
    assert "slice gaps from 0.750 to 1.499 mm (median 0.750 mm)" in reason
    assert "1.499 mm between slices 3 (instance 3) and 4 (instance 5)" in reason
    assert "1 missing slice" in reason


def test_irregular_spacing_is_loaded_when_asked_with_slices_at_their_true_positions(dicom_dir):
    files = _files(dicom_dir / MISSING_SLICE)
    volume = load_series(files, irregular_spacing="process")
    assert volume.outcome is VolumeOutcome.IRREGULAR_SPACING
    assert volume.slice_spacing == pytest.approx(0.75, abs=1e-3)  # the median gap
    assert "1 missing slice" in volume.notes[0]
    assert volume.notes[1:] == ["slice positions lie up to 0.832 mm off the line along the normal (tilted grid)",
                                "4 of the series' 4 instances carry no Frame of Reference UID (required in the image "
                                "plane module); the results use one derived frame of reference"]
    assert volume.pixels.shape == (4, 512, 512) and volume.pixels.dtype == np.float32
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in files)}
    assert [s.dataset.InstanceNumber for s in volume.sources] == [1, 2, 3, 5]
    for index, source in enumerate(volume.sources):
        original = by_uid[str(source.dataset.SOPInstanceUID)]
        # each slice keeps its real position and its own values: outputs reference the real slices
        assert source.position == tuple(float(v) for v in original.ImagePositionPatient)
        expected = original.pixel_array * np.float32(original.RescaleSlope) + np.float32(original.RescaleIntercept)
        assert np.array_equal(volume.pixels[index], expected)
    normal = np.cross(volume.orientation[:3], volume.orientation[3:])
    gaps = np.diff([np.dot(s.position, normal) for s in volume.sources])
    assert gaps == pytest.approx([0.75, 0.75, 1.5], abs=2e-3)


def test_irregular_spacing_takes_only_refuse_or_process(dicom_dir):
    with pytest.raises(ValueError, match="irregular_spacing"):
        load_series(_files(dicom_dir / MISSING_SLICE), irregular_spacing="interpolate")


def test_regular_series_are_unchanged_by_the_setting(dicom_dir):
    files = _files(dicom_dir / "ct06_ge_lightspeed_liver_3slice")
    refused, processed = load_series(files), load_series(files, irregular_spacing="process")
    assert refused.outcome is processed.outcome is VolumeOutcome.VOLUME
    assert refused.notes == processed.notes == []
    assert np.array_equal(refused.pixels, processed.pixels)


def test_all_planes_at_one_position_are_refused(dicom_dir):
    for policy in ("refuse", "process"):
        with pytest.raises(NotAVolumeError) as refused:
            load_series(_files(dicom_dir / "ct09_siemens_same_position_not_volume_4sl"), irregular_spacing=policy)
        assert refused.value.outcome is VolumeOutcome.NOT_A_VOLUME
        assert refused.value.reason.startswith("all 4 planes lie at one position")


def _write_mr_series(folder, planes):
    """Small single-frame MR images, one per (z position, extra attributes) in ``planes``."""
    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for number, (z, extra) in enumerate(planes, start=1):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber = "MR", number
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-2.0, -2.0, float(z)]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        ds.PixelData = np.full((4, 4), number, dtype=np.uint16).tobytes()
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.parametrize("keyword, values", [("TemporalPositionIdentifier", (1, 2)), ("EchoNumbers", (1, 2))])
def test_4d_series_is_refused_with_its_layout_and_what_tells_the_planes_apart(tmp_path, keyword, values):
    # 3 positions x 2 time points (or echoes), sent as one series in acquisition order
    planes = [(z, {keyword: value}) for value in values for z in (0.0, 2.0, 4.0)]
    with pytest.raises(NotAVolumeError) as refused:
        load_series(_write_mr_series(tmp_path / "mr4d", planes), irregular_spacing="process")
    assert refused.value.outcome is VolumeOutcome.NOT_A_VOLUME
    reason = refused.value.reason
    assert reason.startswith("4D data: 3 positions x 2 planes per position")
    assert f"told apart by {keyword} (1, 2)" in reason


def test_repeated_positions_without_a_telling_attribute_say_so(tmp_path):
    planes = [(z, {}) for z in (0.0, 2.0, 4.0)] * 2
    with pytest.raises(NotAVolumeError) as refused:
        load_series(_write_mr_series(tmp_path / "twice", planes))
    assert refused.value.reason.startswith("4D data: 3 positions x 2 planes per position, and no attribute")


def test_partly_repeated_positions_are_refused(tmp_path):
    planes = [(z, {"AcquisitionNumber": 1}) for z in (0.0, 2.0, 4.0, 6.0)] + [(2.0, {"AcquisitionNumber": 2})]
    with pytest.raises(NotAVolumeError) as refused:
        load_series(_write_mr_series(tmp_path / "partly", planes))
    reason = refused.value.reason
    assert reason.startswith("1 of 4 positions hold more than one plane (up to 2; the first at 2.000 mm")
    assert "told apart by AcquisitionNumber (1, 2)" in reason


def test_synthetic_series_loads_in_position_order(tmp_path):
    files = _write_mr_series(tmp_path / "mr", [(z, {}) for z in (4.0, 0.0, 2.0)])
    volume = load_series(files)
    assert volume.outcome is VolumeOutcome.VOLUME and volume.slice_spacing == pytest.approx(2.0)
    assert [s.position[2] for s in volume.sources] == [0.0, 2.0, 4.0]
    assert [int(volume.pixels[i, 0, 0]) for i in range(3)] == [2, 3, 1]  # instance numbers of z = 0, 2, 4


def test_sources_keep_the_whole_header_without_pixel_data(dicom_dir):
    files = _files(dicom_dir / "ct02_philips_ingenuity_headphantom_5mm")
    volume = load_series(files)
    headers = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    for source in volume.sources:
        assert "PixelData" not in source.dataset
        assert source.dataset == headers[str(source.dataset.SOPInstanceUID)]
        assert source.dataset.filename in {str(f) for f in files}


def test_deflated_series_loads_like_its_native_original(dicom_dir, tmp_path):
    """Deflated files are inflated when read, so their pixel data has no offset in the file to read from."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    files = _files(dicom_dir / "ct06_ge_lightspeed_liver_3slice")
    deflated = []
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(tmp_path / f"{index}.dcm", enforce_file_format=True)
        deflated.append(tmp_path / f"{index}.dcm")
    volume = load_series(deflated)
    assert np.array_equal(volume.pixels, load_series(files).pixels)
    assert all("PixelData" not in source.dataset for source in volume.sources)


def test_monochrome1_keeps_its_stored_values_as_dcm2niix_does(dicom_dir, tmp_path):
    """MONOCHROME1 only says that low values display bright: the volume keeps the modality values
    (dcm2niix does not invert either), and a model reads the interpretation from the headers."""
    original = _files(dicom_dir / "mr05_ge_signa_hdxt_prostate_adc")
    for path in original:
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(tmp_path / path.name)
    inverted = load_series(sorted(tmp_path.glob("*.dcm")))
    assert np.array_equal(inverted.pixels, load_series(original).pixels)
    assert {str(s.dataset.PhotometricInterpretation) for s in inverted.sources} == {"MONOCHROME1"}
