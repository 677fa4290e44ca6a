"""Series -> volume on every catalogued series; ct-body + encoders on real CT, checked with dciodvfy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_DIR, dciodvfy_errors

from pacsworker.config import ModelSettings
from pacsworker.worker.runtime import run_model
from pacsworker.worker.volume import NotAVolumeError, load_series

CATALOG = json.loads((DICOM_DIR / "catalog.json").read_text()) if (DICOM_DIR / "catalog.json").is_file() else []
GEOMETRY_CASES = [e for e in CATALOG if e["expected"] != "ignore"]


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("entry", GEOMETRY_CASES, ids=[e["folder"] for e in GEOMETRY_CASES])
def test_volume_outcome_matches_catalog(dicom_dir, entry):
    try:
        volume = load_series(_files(dicom_dir / entry["folder"]))
    except NotAVolumeError as exc:
        outcome = exc.outcome.value
        assert exc.reason, "a refusal must say why"
    else:
        outcome = volume.outcome.value
        distances = [np.dot(s.position, np.cross(volume.orientation[:3], volume.orientation[3:])) for s in volume.sources]
        assert np.all(np.diff(distances) > 0), "slices sorted along the normal"
        assert volume.pixels.shape[0] == len(volume.sources)
    assert outcome == entry["expected"]


def test_rescale_gives_hounsfield_units(dicom_dir):
    volume = load_series(_files(dicom_dir / "ct02_philips_ingenuity_headphantom_5mm"))
    first = pydicom.dcmread(volume.sources[0].dataset.filename)
    raw = first.pixel_array.astype(np.float32)
    expected = raw * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert np.array_equal(volume.pixels[0], expected)
    assert volume.slice_spacing == pytest.approx(5.0)
    assert volume.pixels.min() == pytest.approx(-1024)


@pytest.fixture(scope="module")
def ct02_outcome(dicom_dir):
    return run_model(_files(dicom_dir / "ct02_philips_ingenuity_headphantom_5mm"), ModelSettings(name="ct-body"))


def test_ct_body_results_are_valid_and_deterministic(dicom_dir, ct02_outcome, tmp_path):
    names = {s.spec.name for s in ct02_outcome.statistics}
    assert {"Body", "Bone"} <= names  # a head phantom: no lungs
    for name, ds in ct02_outcome.result_objects().items():
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
    seg = ct02_outcome.seg
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [s.spec.name for s in ct02_outcome.statistics]
    assert seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "ct-body" and algorithm.AlgorithmVersion == "1.0.0"
    again = run_model(_files(dicom_dir / "ct02_philips_ingenuity_headphantom_5mm"), ModelSettings(name="ct-body"))
    for a, b in ((seg, again.seg), (ct02_outcome.sr, again.sr), (ct02_outcome.image_sr, again.image_sr)):
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)


def test_other_series_give_other_uids(dicom_dir, ct02_outcome):
    other = run_model(_files(dicom_dir / "ct06_ge_lightspeed_liver_3slice"), ModelSettings(name="ct-body"))
    assert other.seg.SOPInstanceUID != ct02_outcome.seg.SOPInstanceUID
    assert "Lungs" in {s.spec.name for s in other.statistics}  # liver CT reaches the lung bases


@pytest.mark.parametrize("folder", ["ct07_siemens_definitionas_tilt_no_tilt_tag_4sl", "mr06_siemens_prisma_xa30_t1_enhanced_multiframe"])
def test_encoder_handles_tilted_and_multiframe_sources(dicom_dir, folder, tmp_path):
    volume = load_series(_files(dicom_dir / folder))
    from pacsworker.encoders import encode_results
    from pacsworker.worker.outputs import LabelMap, ModelIdentity, SegmentSpec

    labels = np.zeros(volume.pixels.shape, dtype=np.uint8)
    labels[:, 10:20, 10:30] = 1
    results = encode_results(volume, LabelMap(labels, (SegmentSpec(1, "Box"),)), ModelIdentity("test", "1"))
    path = tmp_path / "seg.dcm"
    results.seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert int(results.seg.NumberOfFrames) == volume.pixels.shape[0]


def test_run_command_writes_seg_and_sr(dicom_dir, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pacsworker", "run", str(dicom_dir / "ct06_ge_lightspeed_liver_3slice"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert pydicom.dcmread(out / "seg.dcm").Modality == "SEG"
    assert pydicom.dcmread(out / "sr.dcm").Modality == "SR"
    refused = subprocess.run(
        [sys.executable, "-m", "pacsworker", "run", str(dicom_dir / "ct09_siemens_same_position_not_volume_4sl"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 3 and "not-a-volume" in refused.stderr


def test_results_carry_colours_names_and_measurements_highdicom_reads_back(dicom_dir, tmp_path):
    import highdicom as hd

    ct02 = _files(dicom_dir / "ct02_philips_ingenuity_headphantom_5mm")
    outcome = run_model(ct02, ModelSettings(name="ct-body"))
    other = run_model(_files(dicom_dir / "ct06_ge_lightspeed_liver_3slice"), ModelSettings(name="ct-body"))
    seg, sr, image_sr = outcome.seg, outcome.sr, outcome.image_sr
    source = pydicom.dcmread(ct02[0], stop_before_pixels=True)
    # names say which model and which source series; numbers differ per source series
    assert seg.SeriesDescription == f"ct-body SEG of {source.SeriesDescription} (series {source.SeriesNumber})"
    assert sr.SeriesDescription.startswith(f"ct-body measurements of {source.SeriesDescription}")
    assert image_sr.SeriesDescription.startswith(f"ct-body lengths of {source.SeriesDescription}")
    numbers = [int(ds.SeriesNumber) for ds in (seg, sr, image_sr)]
    assert numbers == [numbers[0], numbers[0] + 1, numbers[0] + 2] and numbers[0] // 100 == int(source.SeriesNumber)
    assert set(numbers).isdisjoint(int(ds.SeriesNumber) for ds in other.result_objects().values())
    # every segment has a display colour, so viewers raise no colour warning
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence]
    assert len(colours) == len(set(colours)) == len(seg.SegmentSequence)
    for name, ds in outcome.result_objects().items():
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
    # the SRs read back by highdicom: each measurement with its unit and references
    volumetric = hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()
    lengths = hd.sr.srread(tmp_path / "image_sr.dcm").content.get_image_measurement_groups()
    assert len(volumetric) == len(lengths) == len(seg.SegmentSequence) >= 2
    instances = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in ct02}
    for group in volumetric:
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        units = {(m.name.meaning, m.unit.value, m.derivation.meaning if m.derivation else None) for m in group.get_measurements()}
        assert ("Volume", "ml", None) in units
        assert ("Attenuation Coefficient", "[hnsf'U]", "Mean") in units
        assert ("Attenuation Coefficient", "[hnsf'U]", "Standard Deviation") in units
    for group in lengths:
        assert str(group.tracking_identifier) == "Cornerstone3DTools@^0.1.0:Length"  # what OHIF takes over
        [length] = group.get_measurements()
        assert (length.name.value, length.unit.value) == ("103339001", "mm") and length.value > 0
        # the NUM is inferred from its two end points on the image where they lie
        [region] = [item for item in length[0].ContentSequence if item.ValueType == "SCOORD"]
        assert region.RelationshipType == "INFERRED FROM"
        assert region.GraphicType == "POLYLINE" and len(region.GraphicData) == 4
        image = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID  # SELECTED FROM
        assert image in instances  # the source image the end points lie on
        spacing = [float(v) for v in pydicom.dcmread(instances[image], stop_before_pixels=True).PixelSpacing]
        c1, r1, c2, r2 = (float(v) for v in region.GraphicData)
        assert abs(np.hypot((r2 - r1) * spacing[0], (c2 - c1) * spacing[1]) - length.value) < 0.01


def test_validation_gate_finds_wrong_references_and_positions_and_quarantines(dicom_dir, tmp_path):
    import copy

    from pacsworker.encoders.validation import referential_problems, validate_results
    from pacsworker.records import DataLayout, JobRecord, JobState
    from pacsworker.tasks.jobs import _quarantine

    outcome = run_model(_files(dicom_dir / "ct02_philips_ingenuity_headphantom_5mm"), ModelSettings(name="ct-body"))
    assert outcome.problems == [] and validate_results(outcome.volume, outcome.seg, outcome.sr) == []
    seg = copy.deepcopy(outcome.seg)
    frames = seg.PerFrameFunctionalGroupsSequence
    frames[0].DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5"
    frames[1].PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, 999.0]
    problems = referential_problems(outcome.volume, seg, outcome.sr)
    assert any("SEG frame 1 derives from 1.2.3.4.5, which is not in the source series" in p for p in problems)
    assert any(p.startswith("SEG frame 2 lies at [0.0, 0.0, 999.0]") for p in problems)
    sr = copy.deepcopy(outcome.sr)
    del sr.CurrentRequestedProcedureEvidenceSequence
    assert "SR does not list the SEG among its evidence" in referential_problems(outcome.volume, outcome.seg, sr)
    # a job whose results fail the gate: quarantined with the reason, failed, nothing in the outbox
    layout = DataLayout(tmp_path / "data").create()
    job = JobRecord(job_id="ct-body_x_1", series_uid="1.2", study_uid="1.2", model="ct-body", spool_dir=str(tmp_path))
    outcome.problems = problems
    _quarantine(layout, job, outcome)
    assert job.state == JobState.FAILED and job.reason.startswith("results failed validation")
    assert (layout.quarantine / job.job_id / "seg.dcm").is_file()
    assert "derives from 1.2.3.4.5" in (layout.quarantine / job.job_id / "reason.txt").read_text()
    assert not any(layout.outbox.iterdir())


def test_validation_gate_runs_the_iod_validator(dicom_dir):
    import copy

    from pacsworker.encoders.validation import iod_problems

    outcome = run_model(_files(dicom_dir / "ct06_ge_lightspeed_liver_3slice"), ModelSettings(name="ct-body"))
    assert iod_problems({"seg": outcome.seg, "sr": outcome.sr}) == []
    broken = copy.deepcopy(outcome.seg)
    del broken.SegmentSequence[0].SegmentLabel  # type 1 in the Segment Description macro
    problems = iod_problems({"seg": broken})
    assert problems and all(p.startswith("seg: Error") for p in problems)


def test_longest_diameter_equals_a_brute_force_search():
    from pacsworker.encoders.measures import longest_diameter

    rng = np.random.default_rng(7)
    for _ in range(100):
        # slices of different fill (down to one pixel or none), so the search's pruning is exercised
        mask = rng.random((6, 24, 20)) > rng.uniform(0.6, 1.0, size=(6, 1, 1))
        mask[0, 3, 4] = True
        found = longest_diameter(mask, 1.3, 0.7)
        best = 0.0
        for plane in mask:
            points = np.argwhere(plane) * np.array([1.3, 0.7])
            if len(points) > 1:
                best = max(best, float(np.linalg.norm(points[:, None] - points[None], axis=-1).max()))
        assert abs(found.length_mm - best) < 1e-9
        start, end = np.array(found.start), np.array(found.end)
        assert abs(np.linalg.norm((end - start) * [1.3, 0.7]) - best) < 1e-9
        assert mask[found.slice_index][tuple(start.astype(int))] and mask[found.slice_index][tuple(end.astype(int))]


def test_native_pixel_data_is_read_as_pydicom_decodes_it(dicom_dir):
    """The loader reads native little-endian grey pixel data straight from its bytes; on every
    catalog instance that has such data the values equal pydicom's decoding, unused bits and all."""
    from pacsworker.worker.volume import NATIVE_LITTLE_ENDIAN, _stored_values

    checked = 0
    for path in sorted(dicom_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ("PixelData" not in ds or str(ds.file_meta.TransferSyntaxUID) not in NATIVE_LITTLE_ENDIAN
                or int(ds.get("SamplesPerPixel", 1)) != 1):
            continue
        ours, theirs = _stored_values(ds), ds.pixel_array
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), path
        checked += 1
    assert checked >= 50
    # unused high bits holding garbage, signed and unsigned: cleared (sign-extended) as pydicom does
    from pydicom.dataset import FileMetaDataset

    rng = np.random.default_rng(3)
    for signed in (0, 1):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 5, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, signed
        ds.PixelData = rng.integers(0, 65536, size=20, dtype=np.uint16).tobytes()
        assert np.array_equal(_stored_values(ds), ds.pixel_array)


VOLUME_CASES = [e for e in GEOMETRY_CASES if e["expected"] == "volume"]


@pytest.mark.parametrize("entry", VOLUME_CASES, ids=[e["folder"] for e in VOLUME_CASES])
def test_geometry_and_values_equal_dcm2niix(dicom_dir, entry, tmp_path):
    """dcm2niix, the reference converter, on the same folder: the same grid in the world (affine
    within 1e-3 mm, after matching axis order and direction) and the same voxel values."""
    import shutil

    import nibabel as nib

    from pacsworker.worker.export import nifti_affine
    from pacsworker.worker.series import Series

    tool = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(tool).exists():
        pytest.fail("dcm2niix (pip install -e '.[test]') is part of the test environment")
    converted = subprocess.run([tool, "-z", "n", "-b", "n", "-f", "volume", "-o", str(tmp_path), str(dicom_dir / entry["folder"])],
                               capture_output=True, text=True, timeout=120)
    outputs = sorted(tmp_path.glob("*.nii"))
    if converted.returncode != 0 or len(outputs) != 1:
        pytest.skip(f"dcm2niix gives {len(outputs)} volumes for {entry['folder']} (exit {converted.returncode})")
    theirs = nib.load(outputs[0])
    their_values = np.asarray(theirs.get_fdata(dtype=np.float64))
    while their_values.ndim > 3 and their_values.shape[-1] == 1:
        their_values = their_values[..., 0]
    volume = load_series(_files(dicom_dir / entry["folder"]))
    ours = nifti_affine(Series(volume))  # (column, row, slice) -> RAS mm
    our_values = volume.pixels.transpose(2, 1, 0)
    # their voxel axes expressed in ours: a signed permutation
    mapping = np.linalg.inv(ours) @ theirs.affine
    axes = np.rint(mapping[:3, :3])
    assert np.allclose(mapping[:3, :3], axes, atol=1e-3), f"not the same grid: {mapping[:3, :3]}"
    # bring their array into our index order, then both affines must agree
    order = [int(np.flatnonzero(axes[:, j])[0]) for j in range(3)]  # their axis j is our axis order[j]
    aligned = np.moveaxis(their_values, [0, 1, 2], order)
    for our_axis in range(3):
        their_axis = order.index(our_axis)
        if axes[our_axis, their_axis] < 0:
            aligned = np.flip(aligned, axis=our_axis)
    assert aligned.shape == our_values.shape
    # their affine re-indexed to our voxel order must be ours: every voxel centre at the same place
    reindex = np.eye(4)
    reindex[:3, :3] = 0
    for our_axis in range(3):
        their_axis = order.index(our_axis)
        sign = axes[our_axis, their_axis]
        reindex[their_axis, our_axis] = sign
        reindex[their_axis, 3] = our_values.shape[our_axis] - 1 if sign < 0 else 0
    assert np.allclose(theirs.affine @ reindex, ours, atol=1e-3), f"{theirs.affine @ reindex}\n!=\n{ours}"
    assert np.allclose(aligned, our_values, atol=1e-3), f"max difference {np.abs(aligned - our_values).max()}"
