"""Result UIDs name everything that can change a result: the same settings and model files give
the same bytes (a re-send never duplicates), anything else gives new UIDs and an SR that names
its predecessor. Series with per-slice Frames of Reference are decided at load time, and the
encoder never changes the volume's own source headers."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import REPO, dciodvfy_errors, pacsworker_run, write_config
from pacsworker.config import ModelSettings, Settings
from pacsworker.records import SeriesRecord
from pacsworker.worker.runtime import run_model
from pacsworker.worker.volume import load_series

MODELS = Path(__file__).parent / "models"
CT06 = "ct06_ge_lightspeed_liver_3slice"  # 3 slices, one Frame of Reference UID
CODE = ["SCT", "272673000", "Bone"]
SPLEEN = REPO.parent / "shared" / "models" / "monai_spleen_unet_torchscript" / "model.ts"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _bones(source: Path, **extra) -> dict:
    """A python model (tests/models/switchable.py or a copy) finding what is at least ``threshold``."""
    return {"name": "bones", "kind": "python", "source": f"{source}:Switchable", "match": {"min_instances": 1},
            "outputs": {"bone": {"kind": "labelmap", "segments": [{"label": 1, "name": "Bone", "category": CODE,
                                                                    "type": CODE}]}}, **extra}


def test_the_same_settings_on_fresh_data_dirs_give_byte_identical_results(dicom_dir, tmp_path):
    written = []
    for run in ("first", "second"):  # separate processes, separate data dirs
        config = write_config(tmp_path / f"{run}.yaml", storage={"data_dir": str(tmp_path / run / "data")})
        result = pacsworker_run(dicom_dir / CT06, tmp_path / run / "out", config, "ct-body")
        assert result.returncode == 0, result.stderr[-3000:]
        written.append({p.name: p.read_bytes() for p in (tmp_path / run / "out").glob("*.dcm")})
    assert set(written[0]) == {"seg.dcm", "sr.dcm", "image_sr.dcm"}
    for name in written[0]:
        assert written[0][name] == written[1][name], f"{name} differs between two runs of the same settings"
    seg = pydicom.dcmread(tmp_path / "first" / "out" / "seg.dcm")
    source = pydicom.dcmread(_files(dicom_dir / CT06)[0], stop_before_pixels=True)
    # dated as the source series, not by the clock
    assert (seg.ContentDate, seg.SeriesDate, seg.InstanceCreationDate) == (source.ContentDate,) * 3


def test_a_changed_option_reruns_under_new_uids_and_the_sr_names_its_predecessor(dicom_dir, tmp_path):
    from conftest import ledger_of, spool_series
    from pacsworker.tasks.app import configure
    from pacsworker.tasks.jobs import process_series
    from pacsworker.tasks.submit import submit_series

    layout, record, first = spool_series(dicom_dir / CT06, tmp_path / "data")
    jobs = []

    from pacsworker.scp.tracker import _facts

    ledger = ledger_of(layout.root)
    for threshold in (300.0, 200.0):  # the same model file and version; one option changed
        settings = Settings(storage={"data_dir": str(tmp_path / "data")},
                            models=[_bones(MODELS / "switchable.py", options={"threshold": threshold})])
        configure(settings)
        ledger.record_instance(_facts(record), instances=record.instances)  # received (again) and complete
        ledger.complete_series(record.series_uid, instances=record.instances, frames=0,
                               content_digest=record.content_digest, completed_by="test")
        submit_series(settings, record.model_copy())
        [job_id] = [j.job_id for j in ledger.jobs_of_series(record.series_uid)]
        jobs.append(job_id)
        assert process_series(job_id) == "delivering"
    old, new = (ledger.job(job_id) for job_id in jobs)
    assert old.job_id != new.job_id
    for role in ("seg", "sr", "image_sr"):  # other content never goes under the old UIDs
        assert old.outputs[role] != new.outputs[role] and old.outputs[f"{role}_series"] != new.outputs[f"{role}_series"]
    for role in ("sr", "image_sr"):
        sr = pydicom.dcmread(layout.job_outbox(new.job_id) / f"{role}.dcm")
        [study] = sr.PredecessorDocumentsSequence
        [series] = study.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == old.outputs[f"{role}_series"]
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.outputs[role]
        assert dciodvfy_errors(layout.job_outbox(new.job_id) / f"{role}.dcm") == []


def test_a_changed_seg_setting_gives_new_uids(dicom_dir):
    files = _files(dicom_dir / CT06)
    plain = run_model(files, ModelSettings(name="ct-body"))
    other = run_model(files, ModelSettings(name="ct-body", seg={"threshold": 0.4}))
    assert plain.seg.SOPInstanceUID != other.seg.SOPInstanceUID and plain.sr.SOPInstanceUID != other.sr.SOPInstanceUID


def test_a_derived_frame_of_reference_is_the_sources_whatever_the_model(dicom_dir):
    from pacsworker.encoders import encode_results
    from pacsworker.worker.outputs import LabelMap, ModelIdentity, SegmentSpec

    volume = load_series(_files(dicom_dir / "ct07_siemens_definitionas_tilt_no_tilt_tag_4sl"))  # none of its own
    labels = np.zeros(volume.pixels.shape, dtype=np.uint8)
    labels[:, 2:6, 2:8] = 1
    segs = [encode_results(volume, LabelMap(labels, (SegmentSpec(1, "Box"),)), ModelIdentity(name, "1"),
                           provenance=provenance).seg
            for name, provenance in (("a", "x"), ("a", "y"), ("b", "x"))]
    assert len({seg.SOPInstanceUID for seg in segs}) == 3
    assert len({seg.FrameOfReferenceUID for seg in segs}) == 1  # every result on the series lies in one frame


def test_new_bytes_in_the_same_model_file_give_new_uids(dicom_dir, tmp_path, caplog):
    model = tmp_path / "model" / "switchable.py"
    model.parent.mkdir()
    shutil.copy(MODELS / "switchable.py", model)
    settings = ModelSettings(**_bones(model))
    files = _files(dicom_dir / CT06)
    before = run_model(files, settings)
    again = run_model(files, settings)
    assert before.seg.SOPInstanceUID == again.seg.SOPInstanceUID
    model.write_text(model.read_text() + "\n# retrained: same name, same version, other bytes\n")
    with caplog.at_level(logging.WARNING, logger="pacsworker.worker.runtime"):
        after = run_model(files, settings)
    assert "files changed on disk" in caplog.text  # the warm model was loaded again
    assert after.seg.SOPInstanceUID != before.seg.SOPInstanceUID
    assert after.sr.SOPInstanceUID != before.sr.SOPInstanceUID
    assert after.seg.SeriesInstanceUID != before.seg.SeriesInstanceUID


def test_new_bytes_in_the_same_model_file_name_a_new_job_so_a_resend_runs_again(tmp_path):
    from pacsworker.tasks.submit import job_id_for

    model = tmp_path / "model" / "switchable.py"
    model.parent.mkdir()
    shutil.copy(MODELS / "switchable.py", model)
    settings = ModelSettings(**_bones(model))
    record = SeriesRecord(series_uid="1.2.3", study_uid="1.2", content_digest="abc")
    before = job_id_for(settings, record)
    assert job_id_for(settings, record) == before, "the same settings and files name the same job"
    model.write_text(model.read_text() + "\n# retrained: same name, same version, other bytes\n")
    assert job_id_for(settings, record) != before
    model.unlink()  # a receiver on a host without the model's files: named by its settings alone
    assert job_id_for(settings, record).endswith(f"_{settings.fingerprint()}")


def test_an_edited_package_model_runs_its_new_code_under_new_uids(dicom_dir, tmp_path, monkeypatch):
    package = tmp_path / "bonepkg_edit"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(MODELS / "switchable.py", package / "model.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = ModelSettings(**{**_bones(tmp_path), "source": "bonepkg_edit.model:Switchable"})
    files = _files(dicom_dir / CT06)
    before = run_model(files, settings)
    text = (package / "model.py").read_text()
    (package / "model.py").write_text(text.replace("threshold: float = 300.0", "threshold: float = 5000.0"))
    after = run_model(files, settings)  # no voxel reaches 5000 HU: the new code finds nothing
    assert after.seg is None or after.seg.SOPInstanceUID != before.seg.SOPInstanceUID
    assert before.values != after.values, "the edited module's code ran, not the one imported first"


def test_a_torchscript_models_files_are_its_file_and_pipeline_and_their_digest_follows_the_bytes(tmp_path, monkeypatch):
    from pacsworker.worker import model_files as model_files_module
    from pacsworker.worker.model_files import files_digest, model_files

    if not SPLEEN.is_file():
        pytest.skip(f"{SPLEEN} absent")
    shutil.copy(SPLEEN, tmp_path / "model.ts")
    (tmp_path / "pipeline.yaml").write_text("pre: []\ninferer: {name: simple}\npost: []\n")
    settings = ModelSettings(name="spleen", kind="torchscript", source=str(tmp_path / "model.ts"), pipeline="pipeline.yaml")
    assert model_files(settings) == [(tmp_path / "model.ts").resolve(), (tmp_path / "pipeline.yaml").resolve()]
    hashed = []
    original = model_files_module.hashlib.file_digest
    monkeypatch.setattr(model_files_module.hashlib, "file_digest",
                        lambda file, name: hashed.append(file.name) or original(file, name))
    digest = files_digest(model_files(settings))
    assert files_digest(model_files(settings)) == digest
    assert len(hashed) == 2, "each file is hashed once while its size and mtime stay"
    with open(tmp_path / "model.ts", "r+b") as file:  # new weights, same size, same name
        file.seek(-1, 2)
        last = file.read(1)
        file.seek(-1, 2)
        file.write(bytes([last[0] ^ 0xFF]))
    assert files_digest(model_files(settings)) != digest
    assert len(hashed) == 3, "only the changed file is hashed again"


def test_a_python_models_files_are_its_source_its_declared_files_and_option_files(tmp_path):
    from pacsworker.worker.model_files import files_digest, model_files

    source = tmp_path / "net.py"
    source.write_text("class Net:\n    files = ['weights', 'vocab.txt']\n    def predict(self, series):\n        pass\n")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "a.pt").write_bytes(b"a")
    (tmp_path / "vocab.txt").write_text("bone\n")
    (tmp_path / "extra.pt").write_bytes(b"x")
    settings = ModelSettings(name="net", kind="python", source=f"{source}:Net",
                             options={"weights": str(tmp_path / "extra.pt")})

    class Loaded:  # what the adapter holds: the class's instance
        instance = type("Net", (), {"files": ["weights", "vocab.txt"]})()

    found = model_files(settings, Loaded())
    assert found == [source, tmp_path / "weights", tmp_path / "vocab.txt", tmp_path / "extra.pt"]
    digest = files_digest(found)
    (tmp_path / "weights" / "b.pt").write_bytes(b"b")  # a new file in a declared folder
    assert files_digest(found) != digest
    builtin = model_files(ModelSettings(name="ct-body"))
    assert [p.name for p in builtin] == ["ct_body.py"]


def _per_slice_frames_of_reference(source: Path, target: Path) -> list[str]:
    """The series as an anonymiser of a public collection left it: each slice its own Frame of Reference UID."""
    target.mkdir()
    frames = []
    for path in _files(source):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = generate_uid()
        frames.append(ds.FrameOfReferenceUID)
        ds.save_as(target / path.name, enforce_file_format=True)
    return frames


def test_per_slice_frames_of_reference_are_decided_at_load_and_give_one_derived_frame(dicom_dir, tmp_path, caplog):
    frames = _per_slice_frames_of_reference(dicom_dir / CT06, tmp_path / "series")
    with caplog.at_level(logging.WARNING, logger="pacsworker.worker.volume"):
        volume = load_series(_files(tmp_path / "series"))
    [note] = volume.notes
    assert "3 different Frame of Reference UIDs" in note and "one derived frame of reference" in note
    assert note in caplog.text
    assert volume.frame_of_reference_uid is None
    outcome = run_model(_files(tmp_path / "series"), ModelSettings(name="ct-body"))
    assert outcome.notes == [note]  # the job's notes
    assert not outcome.problems, outcome.problems
    seg = outcome.seg
    assert seg.FrameOfReferenceUID not in frames
    for name, ds in outcome.result_objects().items():
        ds.save_as(tmp_path / name, enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / name) == []
    # the same slices with one shared frame: no note, and the SEG keeps the source's frame
    plain = load_series(_files(dicom_dir / CT06))
    assert plain.notes == [] and plain.frame_of_reference_uid is not None


@pytest.mark.parametrize("folder", ["ct07_siemens_definitionas_tilt_no_tilt_tag_4sl",  # no FoR, tilted
                                    "mr17_hyperfine_lowfield_enhanced"])  # enhanced multi-frame
def test_encoding_leaves_the_volumes_source_headers_unchanged(dicom_dir, folder):
    from pacsworker.encoders import encode_results
    from pacsworker.worker.outputs import LabelMap, ModelIdentity, SegmentSpec

    volume = load_series(_files(dicom_dir / folder))
    before = [ds.to_json_dict() for ds in volume.source_datasets]
    labels = np.zeros(volume.pixels.shape, dtype=np.uint8)
    labels[:, 2:6, 2:8] = 1
    results = encode_results(volume, LabelMap(labels, (SegmentSpec(1, "Box"),)), ModelIdentity("test", "1"))
    assert results.seg is not None
    assert [ds.to_json_dict() for ds in volume.source_datasets] == before
