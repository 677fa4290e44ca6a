"""kind monai-deploy: a real MONAI Deploy App SDK application (tests/deploy_app) runs as a model;
its own DICOM SEG passes pacsworker's validation gate and reaches the PACS; applications that
fail, hang or write what must not be sent are stopped at the gate; a MAP's command template runs
with the run's folders (a stand-in for ``docker run``).

The SDK and Holoscan (about 570 MB) are installed for tests only: scripts/install-monai-deploy-test.sh.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import re
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import (
    REPO,
    SEG_CLASS,
    Pacsworker,
    dciodvfy_errors,
    free_port,
    ledger_of,
    missing,
    port_open,
    status_json,
    storescu,
    wait_until,
    write_config,
)

APP = REPO / "tests" / "deploy_app"
FAULTY = APP / "faulty.py"
STAND_IN_MAP = APP / "stand_in_map.py"
SPLEEN = REPO.parent / "shared" / "models" / "monai_spleen_unet_torchscript" / "model.ts"
CT02 = "ct02_philips_ingenuity_headphantom_5mm"
# the pipeline tests/deploy_app/app.py runs, as pacsworker's torchscript adapter is configured
TORCHSCRIPT_PIPELINE = {
    "pre": [
        {"name": "ScaleIntensityRanged", "args": {"a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0, "clip": True}},
        {"name": "CropForegroundd", "args": {"source_key": "image"}},
        {"name": "Spacingd", "args": {"pixdim": [1.5, 1.5, 2.5], "mode": "bilinear"}},
    ],
    "inferer": {"name": "sliding_window", "roi_size": [96, 96, 48], "sw_batch_size": 2, "overlap": 0.25},
    "post": [
        {"name": "AsDiscreted", "args": {"argmax": True}},
        {"name": "KeepLargestConnectedComponentd", "args": {"applied_labels": [1]}},
    ],
}


@pytest.fixture(scope="module")
def sdk() -> str:
    """The installed App SDK's version; a missing SDK skips (or fails, with PACSWORKER_REQUIRE_SERVERS=1)."""
    try:
        version = importlib.metadata.version("monai-deploy-app-sdk")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    if not version or importlib.util.find_spec("holoscan") is None:
        missing("monai-deploy-app-sdk with holoscan (scripts/install-monai-deploy-test.sh)")
    if not SPLEEN.is_file():
        pytest.skip(f"{SPLEEN} absent")
    return version


def _settings(name: str, **fields):
    from pacsworker.config import ModelSettings

    return ModelSettings(name=name, kind="monai-deploy", device="cpu", **fields)


def _faulty(fault: str, **options):
    return {"name": fault, "kind": "monai-deploy", "source": str(FAULTY), "device": "cpu",
            "options": {"env": {"PACSWORKER_TEST_FAULT": fault}, **options}}


@pytest.fixture(scope="module")
def spleen_run(sdk, dicom_dir):
    """The spleen application run once through ``run_model`` on CT02 (about 25 s on 2 cores)."""
    from pacsworker.worker.runtime import run_model

    files = sorted((dicom_dir / CT02).glob("*.dcm"))
    # a result check on the segment the application's SEG names: evaluated on the decoded SEG
    checks = {"results": [{"segment": "Spleen", "measure": "volume_ml", "max": 2000}]}
    return files, run_model(files, _settings("spleen-app", source=str(APP), model_path=SPLEEN, checks=checks))


def test_the_applications_seg_passes_the_gate_and_agrees_with_the_torchscript_adapter(spleen_run, tmp_path):
    from pacsworker.config import ModelSettings
    from pacsworker.worker.runtime import run_model

    files, outcome = spleen_run
    assert outcome.problems == [] and outcome.implausible == [], outcome.problems + outcome.implausible
    assert outcome.seg is None and outcome.sr is None and outcome.has_results
    assert list(outcome.objects) == ["app-seg-1.dcm"]
    seg = outcome.objects["app-seg-1.dcm"]
    source = outcome.volume.sources[0].dataset
    assert seg.SOPClassUID == SEG_CLASS and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "Spleen"
    assert seg.ContributingEquipmentSequence[0].Manufacturer == "pacsworker tests"
    # the application read its folders and model from the SDK's standard environment
    assert f"model_path={SPLEEN}" in outcome.app_log and "input_path=/" in outcome.app_log
    path = tmp_path / "app-seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    torchscript = run_model(files, ModelSettings(
        name="spleen-ts", kind="torchscript", source=str(SPLEEN), device="cpu", pipeline=TORCHSCRIPT_PIPELINE,
        outputs={"seg": {"kind": "labelmap", "segments": [{"label": 1, "name": "Spleen"}]}},
    ))
    ours = torchscript.label_map.array.astype(bool)
    uids = [str(s.dataset.SOPInstanceUID) for s in outcome.volume.sources]
    theirs = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=True).astype(bool)
    assert theirs.shape == ours.shape == (28, 512, 512)
    assert np.array_equal(outcome.label_map.array.astype(bool), theirs)  # as the runtime decoded it
    assert [s.name for s in outcome.label_map.segments] == ["Spleen"]
    assert ours.sum() > 0, "the network should mark something for the comparison to mean anything"
    dice = 2 * (ours & theirs).sum() / (ours.sum() + theirs.sum())
    # the same network, transforms and inferer on the same grid: the SDK's volume and the
    # adapter's agree voxel for voxel (measured: Dice 1.0 on 38 voxels; a head phantom has little spleen)
    assert dice >= 0.95, f"Dice {dice:.3f}: application {int(theirs.sum())} voxels, adapter {int(ours.sum())}"


def test_the_gate_catches_an_application_seg_off_its_sources_or_of_another_study(spleen_run):
    from pacsworker.encoders.validation import validate_objects

    _, outcome = spleen_run
    seg = outcome.objects["app-seg-1.dcm"]
    moved = copy.deepcopy(seg)
    plane = moved.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    plane.ImagePositionPatient = [float(v) + 5 for v in plane.ImagePositionPatient]
    problems = validate_objects(outcome.volume, {"app-seg-1.dcm": moved})
    assert len(problems) == 1 and problems[0].startswith("app-seg-1.dcm: SEG frame 1 lies at")

    elsewhere = copy.deepcopy(seg)
    elsewhere.StudyInstanceUID = "1.2.3.4"
    assert validate_objects(outcome.volume, {"app-seg-1.dcm": elsewhere}) == [
        f"app-seg-1.dcm: belongs to study 1.2.3.4, not the source series' study {outcome.volume.study_uid}"]

    source_copy = copy.deepcopy(outcome.volume.sources[0].dataset)
    problems = validate_objects(outcome.volume, {"app-ct-1.dcm": source_copy})
    assert problems[0] == "app-ct-1.dcm: is an instance of the source series, not a new result"


def _jobs_by_model(data: Path) -> dict:
    return {job.model: job for job in ledger_of(data).latest_jobs(limit=100)}


def test_application_results_through_serve(tmp_path, dicom_dir, orthanc, sdk):
    """The application's SEG reaches the PACS; one that exits non-zero fails its job with its log;
    a SEG dciodvfy rejects and an object of another study are quarantined, nothing of them sent."""
    port = free_port()
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "pacsworker.yaml",
        scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 2},
        storage={"data_dir": str(data)},
        queue={"heartbeat_seconds": 1},
        models=[
            {"name": "spleen-app", "kind": "monai-deploy", "source": str(APP), "model_path": str(SPLEEN),
             "device": "cpu"},
            _faulty("crash"), _faulty("foreign-study"), _faulty("default-model-info"),
        ],
        destinations=[{"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}],
    )
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, dicom_dir / CT02).returncode == 0
        wait_until(lambda: status_json(config)["jobs"].get("done", 0) >= 1 and status_json(config)["jobs"].get("failed", 0) >= 3,
                   420, interval=2, what="the application's job done, three failed")
    finally:
        serve.stop()
    jobs = _jobs_by_model(data)
    study = jobs["spleen-app"].study_uid

    spleen = jobs["spleen-app"]
    assert spleen.state == "done", spleen.reason
    seg = orthanc.retrieve(study, spleen.outputs["app-seg-1_series"], spleen.outputs["app-seg-1"])
    assert seg.SOPClassUID == SEG_CLASS and seg.SegmentSequence[0].SegmentLabel == "Spleen"
    assert [i.file_name for i in ledger_of(data).delivered_instances(spleen.job_id)] == ["app-seg-1.dcm"]
    assert "Graph execution finished" in (data / "jobs" / f"{spleen.job_id}.app.log").read_text()

    crash = jobs["crash"]
    assert crash.state == "failed"
    assert crash.reason.startswith("application crash exited with status 1; its last lines:")
    assert "RuntimeError: the faulty application gives up: no spleen in this series" in crash.reason
    log = data / "jobs" / f"{crash.job_id}.app.log"
    assert f"(full log: {log})" in crash.reason and "Traceback" in log.read_text()

    foreign = jobs["foreign-study"]
    assert foreign.state == "failed" and "results failed validation" in foreign.reason
    assert "app-ct-1.dcm: belongs to study" in foreign.reason
    kept = data / "quarantine" / foreign.job_id
    copy = pydicom.dcmread(kept / "app-ct-1.dcm", stop_before_pixels=True)
    assert copy.StudyInstanceUID != study and orthanc.study_instances(str(copy.StudyInstanceUID)) == []
    assert (kept / "app-files" / "notes" / "summary.txt").read_text() == "one image, another study\n"
    assert "belongs to study" in (kept / "reason.txt").read_text()

    # the SDK's SEG writer with its default ModelInfo leaves the Contributing Equipment's
    # Manufacturer (Type 1) empty: dciodvfy's error keeps that SEG from the PACS
    plain = jobs["default-model-info"]
    assert plain.state == "failed"
    assert "Empty attribute (no value) Type 1 Required Element=<Manufacturer>" in plain.reason
    rejected = pydicom.dcmread(data / "quarantine" / plain.job_id / "app-seg-1.dcm", stop_before_pixels=True)
    in_pacs = {i["00080018"]["Value"][0] for i in orthanc.study_instances(study)}
    assert str(rejected.SOPInstanceUID) not in in_pacs and spleen.outputs["app-seg-1"] in in_pacs


def test_an_application_past_its_time_limit_is_stopped_with_its_process_group(dicom_dir, tmp_path):
    from pacsworker.worker.outputs import ModelRunError
    from pacsworker.worker.runtime import run_model

    pidfile = tmp_path / "child.pid"
    settings = _settings("sleeper", command="/bin/sh -c 'sleep 300 & echo $! > \"$PIDFILE\"; echo started; wait'",
                         options={"timeout_seconds": 2, "env": {"PIDFILE": str(pidfile)}})
    with pytest.raises(ModelRunError) as raised:
        run_model(sorted((dicom_dir / CT02).glob("*.dcm")), settings)
    assert str(raised.value) == ("application sleeper ran past its time limit of 2 s (options.timeout_seconds) "
                                 "and was stopped with its process group; its last lines:\nstarted")
    stat = Path(f"/proc/{pidfile.read_text().strip()}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"), "the application's child lives on"


def test_a_map_command_template_runs_with_the_runs_folders(dicom_dir):
    """``docker run`` of a MAP, played by a stand-in script: placeholders become the run's folders."""
    from pacsworker.worker.runtime import run_model

    template = (f"{sys.executable} {STAND_IN_MAP} run --rm -v {{input}}:/var/holoscan/input:ro "
                "-v {output}:/var/holoscan/output -v {model}:/opt/holoscan/models:ro spleen-map:1.0")
    outcome = run_model(sorted((dicom_dir / CT02).glob("*.dcm")),
                        _settings("map", command=template, model_path=SPLEEN))
    assert outcome.problems == [] and list(outcome.objects) == ["app-seg-1.dcm"]
    assert outcome.objects["app-seg-1.dcm"].SeriesDescription == "spleen-map:1.0 bone"
    report = json.loads(outcome.app_files["map-report.json"])
    mounts, env = report["mounts"], report["holoscan_env"]
    assert report["input_files"] == 28 and report["model_mounted"]
    assert mounts["/var/holoscan/input"] == env["HOLOSCAN_INPUT_PATH"]
    assert mounts["/var/holoscan/output"] == env["HOLOSCAN_OUTPUT_PATH"]
    assert mounts["/opt/holoscan/models"] == env["HOLOSCAN_MODEL_PATH"] == str(SPLEEN)
    assert "28 images in, bone.dcm out" in outcome.app_log


@pytest.mark.parametrize("fields, reason", [
    ({"command": "docker run -v {input}:/in -v {scratch}:/tmp map:1"}, "command names {scratch}; known placeholders"),
    ({"command": "docker run -v {model}:/opt/holoscan/models map:1"}, "command uses {model} but model_path is not set"),
    ({"command": "no-such-container-runtime run map:1"}, "command 'no-such-container-runtime' not found"),
    ({"source": "/nowhere/app.py"}, "is neither a .py file nor an application folder"),
    ({"source": str(FAULTY), "model_path": "/nowhere/model.ts"}, "model_path /nowhere/model.ts does not exist"),
])
def test_a_misconfigured_application_fails_to_load_with_the_reason(fields, reason):
    from pacsworker.worker.adapters import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match=re.escape(reason)):
        load_model(_settings("misconfigured", **fields))
