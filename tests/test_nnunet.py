"""kind nnunet: real nnU-Net v2 trained-model folders, made once per test run with nnU-Net's own
tools on a toy dataset the test writes, against ``nnUNetv2_predict_from_modelfolder`` on a NIfTI
of the same series made by dcm2niix, voxel for voxel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import (
    REPO,
    Pacsworker,
    dciodvfy_errors,
    free_port,
    ledger_of,
    pacsworker_run,
    port_open,
    status_json,
    storescu,
    wait_until,
    write_config,
)

pytest.importorskip("nnunetv2", reason="the nnunet extra (pip install '.[nnunet]'; scripts/test.sh installs it)")

SHAPE = (12, 32, 32)  # (slices, rows, columns) of the toy images
SPACING = (2.5, 0.8, 0.8)  # mm, (slice, row, column): anisotropic, so nnU-Net plans a 2d and a 3d_fullres
LABELS = {"background": 0, "ball": 1, "cube": 2}
BIN = Path(sys.executable).parent


def toy_case(seed: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """An image in HU, (slices, rows, columns), with a bright ball and a fainter cuboid, and its labels."""
    rng = np.random.default_rng(seed)
    z, y, x = (axis / (n - 1) for axis, n in zip(np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]], shape, strict=True))
    centre = rng.uniform([0.35, 0.3, 0.3], [0.65, 0.45, 0.45])
    ball = ((z - centre[0]) / 0.3) ** 2 + ((y - centre[1]) / 0.19) ** 2 + ((x - centre[2]) / 0.19) ** 2 <= 1
    cube = (abs(z - 0.5) <= 0.2) & (abs(y - (1 - centre[1])) <= 0.13) & (abs(x - (0.87 - centre[2])) <= 0.1) & ~ball
    image = rng.normal(0, 20, shape) + 300 * ball + 120 * cube - 100
    return image.astype(np.float32), (ball * 1 + cube * 2).astype(np.uint8)


def write_dataset(raw: Path, cases: int = 5, shape: tuple[int, int, int] = SHAPE,
                  spacing: tuple[float, float, float] = SPACING) -> None:
    """nnU-Net's raw dataset layout: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json;
    axial images in LPS written as NIfTI (column, row, slice) in RAS, as a trainer reads them."""
    folder = raw / "Dataset901_Toy"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    for case in range(cases):
        image, labels = toy_case(case, shape)
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), folder / "imagesTr" / f"toy_{case:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), affine), folder / "labelsTr" / f"toy_{case:03d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                     "numTraining": cases, "file_ending": ".nii.gz"}))


def make_trained_models(env: dict, runs: list[str], **dataset) -> Path:
    """``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train`` (tests/nnunet_train.py: its epoch cut to
    a few iterations) for each ``configuration:fold`` of ``runs``; returns the dataset's results folder."""
    write_dataset(Path(env["nnUNet_raw"]), **dataset)
    configurations = sorted({run.split(":")[0] for run in runs})
    # the planner sizes its thread pool from nnUNet_n_proc_DA and refuses 0
    planned = subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "901", "-c", *configurations,
                              "-np", *["1"] * len(configurations)], env=dict(env, nnUNet_n_proc_DA="1"),
                             capture_output=True, text=True, timeout=900)
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    trained = subprocess.run([sys.executable, str(REPO / "tests" / "nnunet_train.py"), "901", *runs],
                             env=env, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    return Path(env["nnUNet_results"]) / "Dataset901_Toy"


def write_ct_series(folder: Path, seed: int = 11) -> Path:
    """A toy case as an axial CT series, one file per slice (rows run anterior to posterior)."""
    folder.mkdir(parents=True)
    image, _ = toy_case(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for index, plane in enumerate(image):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Toy^Case", "TOY1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "080000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "test", 3, index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-12.0, 5.0, index * SPACING[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [SPACING[1], SPACING[2]], SPACING[0]
        ds.PositionReferenceIndicator, ds.KVP = "", 120
        ds.Rows, ds.Columns = SHAPE[1], SHAPE[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (np.rint(plane) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"ct{index:03d}.dcm", enforce_file_format=True)
    return folder


def nnunet_folders(root: Path) -> dict:
    """The environment nnU-Net's commands need: its folders under ``root``, and 2 CPU processes at most."""
    return dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                nnUNet_results=str(root / "results"), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> dict:
    return nnunet_folders(tmp_path_factory.mktemp("nnunet"))


@pytest.fixture(scope="session")
def trained(nnunet_env) -> dict[str, Path]:
    """Trained-model folders by configuration: 3d_fullres with folds 0 and 1, 2d with fold 0."""
    results = make_trained_models(nnunet_env, ["3d_fullres:0", "3d_fullres:1", "2d:0"])
    return {configuration: results / f"nnUNetTrainer__nnUNetPlans__{configuration}"
            for configuration in ("3d_fullres", "2d")}


@pytest.fixture(scope="session")
def toy_series(tmp_path_factory) -> Path:
    return write_ct_series(tmp_path_factory.mktemp("toy-ct") / "series")


@pytest.fixture(scope="session")
def nnunet_predict(nnunet_env, toy_series, tmp_path_factory):
    """What a researcher does without pacsworker: dcm2niix on the toy series, then
    ``nnUNetv2_predict_from_modelfolder`` with ``--save_probabilities``; ``(model, folds) -> the
    label NIfTI`` (its ``case.npz`` beside it), each made once per test run."""
    made: dict[tuple[Path, tuple[str, ...]], Path] = {}

    def predict(model: Path, folds: list[str]) -> Path:
        if (model, tuple(folds)) not in made:
            out = tmp_path_factory.mktemp("nnunet-predict")
            converted = subprocess.run([str(BIN / "dcm2niix"), "-z", "i", "-b", "n", "-f", "case_0000", "-o", str(out),
                                        str(toy_series)], capture_output=True, text=True, timeout=120)
            assert converted.returncode == 0, converted.stderr
            predicted = subprocess.run(
                [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(out), "-o", str(out / "out"), "-m", str(model),
                 "-f", *folds, "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities"],
                env=nnunet_env, capture_output=True, text=True, timeout=600)
            assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
            made[model, tuple(folds)] = out / "out" / "case.nii.gz"
        return made[model, tuple(folds)]

    return predict


def on_series_grid(nifti: Path | nib.Nifti1Image, volume) -> np.ndarray:
    """A NIfTI's voxels at the series' (slice, row, column) voxel centres, found through both affines
    (no assumption about the order dcm2niix wrote the axes in)."""
    from pacsworker.worker.export import nifti_affine
    from pacsworker.worker.series import Series

    image = nib.load(nifti) if isinstance(nifti, Path) else nifti
    ours = nifti_affine(Series(volume))  # (column, row, slice) -> RAS
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in volume.pixels.shape[::-1]), indexing="ij"), axis=-1)
    world = grid @ ours[:3, :3].T + ours[:3, 3]
    theirs = np.rint((world - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T).astype(int)
    values = np.asarray(image.dataobj)
    return values[theirs[..., 0], theirs[..., 1], theirs[..., 2]].transpose(2, 1, 0)


def seg_labels(seg, volume) -> np.ndarray:
    """The SEG's segments as one label volume, each voxel the dataset.json value of its segment's name."""
    import highdicom as hd

    read = hd.seg.Segmentation.from_dataset(seg)
    uids = [str(source.dataset.SOPInstanceUID) for source in volume.sources]
    by_number = {int(item.SegmentNumber): LABELS[item.SegmentLabel] for item in seg.SegmentSequence}
    stack = read.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=sorted(by_number))
    labels = np.zeros(stack.shape[:3], np.uint8)
    for index, number in enumerate(sorted(by_number)):
        labels[stack[..., index] > 0] = by_number[number]
    return labels


@pytest.mark.parametrize(("configuration", "folds"), [("3d_fullres", ["0"]), ("3d_fullres", ["0", "1"]), ("2d", ["0"])],
                         ids=["3d_fullres-fold0", "3d_fullres-ensemble", "2d-fold0"])
def test_seg_equals_nnunetv2_predict(trained, toy_series, nnunet_predict, configuration, folds):
    from pacsworker.config import ModelSettings
    from pacsworker.worker.runtime import run_model

    settings = ModelSettings(name="toy", kind="nnunet", source=str(trained[configuration]), device="cpu",
                             folds=None if folds == ["0", "1"] else [int(f) for f in folds])
    outcome = run_model(sorted(toy_series.glob("*.dcm")), settings)
    assert outcome.seg is not None, outcome.reason
    reference = on_series_grid(nnunet_predict(trained[configuration], folds), outcome.volume)
    ours = seg_labels(outcome.seg, outcome.volume)
    assert len(np.unique(reference)) > 1, "the toy model predicts one class only: the comparison would be weak"
    assert np.array_equal(ours, reference), f"{int((ours != reference).sum())} of {ours.size} voxels differ"
    assert {item.SegmentLabel for item in outcome.seg.SegmentSequence} <= {"ball", "cube"}


def test_probabilities_are_a_fractional_seg_equal_to_nnunetv2_predicts(trained, toy_series, nnunet_predict, tmp_path):
    """outputs: with kind probabilities gives nnU-Net's softmax as a FRACTIONAL SEG, coded as configured."""
    import highdicom as hd

    from pacsworker.config import ModelSettings
    from pacsworker.worker.runtime import run_model

    model = trained["3d_fullres"]
    cube = {"label": 2, "name": "Cube", "type": ["SCT", "91723000", "Anatomical structure"]}
    # a toy trained for a few iterations may never be 50 % sure of a class: a low threshold keeps both
    # segments in the SEG (its fractional values are nnU-Net's whatever the threshold)
    settings = ModelSettings(name="toy-p", kind="nnunet", source=str(model), device="cpu", folds=[0],
                             outputs={"p": {"kind": "probabilities", "segments": [cube]}}, seg={"threshold": 0.01})
    outcome = run_model(sorted(toy_series.glob("*.dcm")), settings)
    seg = outcome.seg
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    # dataset.json's name, then outputs:' (a toy trained for 3 iterations may never make one of them the most
    # probable anywhere: the SEG leaves such a segment out, as for any model)
    present = [item.SegmentLabel for item in seg.SegmentSequence]
    assert present in (["ball", "Cube"], ["ball"], ["Cube"]), present
    for item in seg.SegmentSequence:
        if item.SegmentLabel == "Cube":
            assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "91723000"
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    labels = nnunet_predict(model, ["0"])
    softmax = np.load(labels.with_name("case.npz"))["probabilities"]  # (channels, k, j, i) as its reader gave them
    affine = nib.load(labels).affine
    uids = [str(source.dataset.SOPInstanceUID) for source in outcome.volume.sources]
    stored = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(range(1, len(present) + 1)), rescale_fractional=False)
    for index, channel in enumerate({"ball": 1, "Cube": 2}[label] for label in present):
        theirs = on_series_grid(nib.Nifti1Image(softmax[channel].transpose(2, 1, 0), affine), outcome.volume)
        difference = np.abs(stored[..., index].astype(int) - np.rint(theirs * 255))
        assert difference.max() <= 1, f"channel {channel}: {int((difference > 1).sum())} voxels differ"


def test_run_and_models_test_with_nnunetv2_predicts_mask_as_reference_case(trained, toy_series, nnunet_predict,
                                                                            tmp_path):
    """`pacsworker run` writes the SEG named from dataset.json; `models test` passes a reference case
    whose mask is nnUNetv2_predict's, at Dice 1."""
    from pacsworker.worker.export import nifti_affine
    from pacsworker.worker.series import Series
    from pacsworker.worker.volume import load_series

    model = trained["2d"]
    volume = load_series(sorted(toy_series.glob("*.dcm")))
    theirs = on_series_grid(nnunet_predict(model, ["0"]), volume)
    expected = tmp_path / "expected_mask.nii.gz"
    nib.save(nib.Nifti1Image(theirs.transpose(2, 1, 0).astype(np.uint8), nifti_affine(Series(volume))), expected)
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")}, models=[{
        "name": "toy", "kind": "nnunet", "source": str(model), "device": "cpu",
        "tests": [{"input": str(toy_series), "expected_mask": str(expected), "min_dice": 1.0}]}])
    out = tmp_path / "out"
    ran = pacsworker_run(toy_series, out, config, "toy")
    assert ran.returncode == 0, ran.stderr[-3000:]
    seg = pydicom.dcmread(out / "seg.dcm")
    assert {item.SegmentLabel for item in seg.SegmentSequence} <= {"ball", "cube"}
    assert dciodvfy_errors(out / "seg.dcm") == []
    tested = subprocess.run([sys.executable, "-m", "pacsworker", "models", "test", "toy", "--config", str(config)],
                            capture_output=True, text=True, timeout=600)
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert "Dice 1.0000" in tested.stdout


GRID_CASES = ["ct02_philips_ingenuity_headphantom_5mm", "mr05_ge_signa_hdxt_prostate_adc",
              "mr06_siemens_prisma_xa30_t1_enhanced_multiframe", "mr12_siemens_trio_4sl_j2k_lossless",
              "mr17_hyperfine_lowfield_enhanced"]


@pytest.mark.parametrize("folder", GRID_CASES)
def test_the_image_is_what_nnunets_readers_read_from_dcm2niix(dicom_dir, tmp_path, folder):
    """Axial CT, oblique 2D MR, sagittal and axial 3D MR (which dcm2niix turns): for each reader the
    array and spacing equal what nnU-Net's own reader class reads from dcm2niix's NIfTI; outputs on
    that grid come back onto the series' grid."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient

    from pacsworker.worker.adapters.nnunet import reader_grid
    from pacsworker.worker.series import Series
    from pacsworker.worker.volume import load_series

    converted = subprocess.run([str(BIN / "dcm2niix"), "-z", "i", "-b", "n", "-f", "case", "-o", str(tmp_path),
                                str(dicom_dir / folder)], capture_output=True, text=True, timeout=120)
    assert converted.returncode == 0, converted.stderr
    series = Series(load_series(sorted(p for p in (dicom_dir / folder).rglob("*") if p.is_file())))
    for reader in (SimpleITKIO, NibabelIO, SimpleITKIOWithReorient, NibabelIOWithReorient):
        theirs, properties = reader().read_images([str(tmp_path / "case.nii.gz")])
        grid = reader_grid(series, reader.__name__)
        ours = grid.image(series)
        assert ours.shape == theirs.shape and np.allclose(ours, theirs, atol=1e-3), reader.__name__
        # the slice gap: the series' median where dcm2niix may write the slice thickness (mr05: 6e-5 mm apart)
        assert np.allclose(grid.spacing, properties["spacing"], rtol=1e-4), (reader.__name__, grid.spacing)
        assert np.array_equal(grid.to_series(ours[0]), series.pixels)
        assert np.array_equal(grid.to_series(np.stack([ours[0], -ours[0]]))[1], -series.pixels)


def test_region_based_segments_take_the_values_nnunet_writes():
    """A region-based dataset.json: region i is the segment written as regions_class_order[i], as
    nnU-Net's label manager turns the region probabilities into its label map."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from pacsworker.worker.adapters.nnunet import dataset_segments

    dataset = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
               "regions_class_order": [1, 2, 3]}
    manager = LabelManager(dataset["labels"], dataset["regions_class_order"])
    segments = dataset_segments(dataset, manager)
    probabilities = np.zeros((3, 1, 1, 3), np.float32)
    for channel in range(3):
        probabilities[channel, 0, 0, channel] = 1.0  # only region `channel` at voxel `channel`
    labels = manager.convert_probabilities_to_segmentation(probabilities)
    assert [(s.spec.name, s.channel) for s in segments] == [("whole tumor", 0), ("tumor core", 1), ("enhancing tumor", 2)]
    assert [s.value for s in segments] == [int(labels[0, 0, s.channel]) for s in segments] == [1, 2, 3]
    plain = {"labels": {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}}
    assert [(s.value, s.channel, s.spec.name) for s in dataset_segments(plain, LabelManager(plain["labels"], None))] == \
        [(1, 1, "liver"), (2, 2, "tumour")]


def test_what_it_cannot_run_is_refused_with_the_reason(trained, tmp_path):
    from pacsworker.config import ModelSettings
    from pacsworker.worker.adapters import ModelLoadError, load_model

    segments = {"kind": "labelmap", "segments": [{"label": 1, "name": "A"}]}
    with pytest.raises(ValueError, match="kind nnunet has one output"):
        ModelSettings(name="x", kind="nnunet", source="/m", outputs={"a": segments, "b": segments})
    with pytest.raises(ValueError, match="not score"):
        ModelSettings(name="x", kind="nnunet", source="/m", outputs={"a": {"kind": "score", "name": ["a", "b", "c"]}})
    with pytest.raises(ModelLoadError, match="is not an nnU-Net trained-model folder \\(no dataset.json\\)"):
        load_model(ModelSettings(name="x", kind="nnunet", source=str(tmp_path), device="cpu"))
    with pytest.raises(ModelLoadError, match="no fold_N/checkpoint_latest.pth"):
        load_model(ModelSettings(name="x", kind="nnunet", source=str(trained["2d"]), device="cpu",
                                 checkpoint="checkpoint_latest.pth"))
    with pytest.raises(ModelLoadError, match=r"label\(s\) \[7\] are not in the model's dataset.json labels"):
        load_model(ModelSettings(name="x", kind="nnunet", source=str(trained["2d"]), device="cpu",
                                 outputs={"seg": {"kind": "labelmap", "segments": [{"label": 7, "name": "Seven"}]}}))


def test_through_the_queue_to_the_pacs_and_its_plausibility_checks(trained, toy_series, nnunet_predict, orthanc, tmp_path):
    """`pacsworker serve`: the series sent by C-STORE becomes a job per model; nnU-Net's label map
    reaches the PACS as a SEG; a model whose result fails its checks is withheld."""
    port, data = free_port(), tmp_path / "data"
    config = write_config(
        tmp_path / "pacsworker.yaml", scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 2},
        storage={"data_dir": str(data)}, queue={"heartbeat_seconds": 1},
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
        models=[{"name": "toy", "kind": "nnunet", "source": str(trained["3d_fullres"]), "folds": [0], "device": "cpu",
                 "match": {"modalities": ["CT"], "min_instances": 1}},
                {"name": "toy-checked", "kind": "nnunet", "source": str(trained["2d"]), "device": "cpu",
                 "match": {"modalities": ["CT"], "min_instances": 1},
                 "checks": {"results": [{"segment": "ball", "measure": "volume_ml", "max": 0.001}]}}])
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, toy_series).returncode == 0
        wait_until(lambda: sum(status_json(config)["jobs"].get(state, 0) for state in ("done", "implausible")) >= 2,
                   300, interval=2, what="both models' jobs to end")
    finally:
        serve.stop()
    jobs = {job.model: job for job in ledger_of(data).latest_jobs(limit=10)}
    delivered, checked = jobs["toy"], jobs["toy-checked"]
    assert delivered.state == "done", delivered.reason
    seg = orthanc.retrieve(delivered.study_uid, delivered.outputs["seg_series"], delivered.outputs["seg"])
    from pacsworker.worker.volume import load_series

    volume = load_series(sorted(toy_series.glob("*.dcm")))
    assert np.array_equal(seg_labels(seg, volume), on_series_grid(nnunet_predict(trained["3d_fullres"], ["0"]), volume))
    assert checked.state == "implausible" and "ball volume_ml is" in checked.reason, checked.reason
