"""What an operator reads when something is not as expected: `status` and the status page with each
job's values and destinations, headings that match the states, and the words of `run` and `replay`
when they cannot do what was asked (which model names exist, which series a folder holds, why a
peer could not be reached)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, write_config
from pacsworker.config import Settings
from pacsworker.records import (
    DataLayout,
    DeliveryRecord,
    DeliveryState,
    DestinationOutcome,
    JobRecord,
    JobState,
    write_json_atomic,
)
from pacsworker.replay import replay

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
CT04 = "ct04_philips_ingenuity_headphantom_scout"
CT06 = "ct06_ge_lightspeed_liver_3slice"
CT02_SERIES = "1.3.46.670589.33.1.6002432791750815306.26862469513794233732"
CT04_SERIES = "1.3.46.670589.33.1.17491953482334658115.21841165151607525240"


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsworker", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


def _job(job_id: str, state: JobState, **fields) -> JobRecord:
    return JobRecord(job_id=job_id, series_uid="1.2.3", study_uid="1.2", model=job_id.split("_")[0],
                     spool_dir="/nowhere", state=state, finished_at=time.time(), **fields)


BRAIN_VALUES = {"segments": {"Brain": {"volume_ml": 1234.5, "voxels": 1234500, "mean": 412.0, "sd": 80.1, "unit": ""}},
                "age": {"kind": "score", "name": ["DCM", "121033", "Subject Age"], "value": 42.0},
                "finding": {"kind": "classification", "name": ["DCM", "121071", "Finding"], "value": "yes",
                            "meaning": ["SCT", "373066001", "Yes"], "score": 0.91}}


@pytest.fixture
def records(tmp_path):
    """A data_dir with a job done (values, delivered to one destination, pending at another), one
    failed and one without a result."""
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")})
    layout = DataLayout(tmp_path / "data").create()
    done = _job("mr-brain_1.2.3_abc_def", JobState.DONE, values=BRAIN_VALUES)
    failed = _job("broken_1.2.3_abc_def", JobState.FAILED, reason="model broken failed to load")
    empty = _job("ct-body_1.2.3_abc_def", JobState.NO_RESULT, reason="not-a-volume: 1 image plane(s)")
    for job in (done, failed, empty):
        write_json_atomic(layout.job_record(job.job_id), job)
    delivery = DeliveryRecord(job_id=done.job_id, files=["seg.dcm"], destinations={
        "orthanc": DestinationOutcome(state=DeliveryState.DELIVERED, attempts=1),
        "pacs": DestinationOutcome(state=DeliveryState.PENDING, attempts=2, last_error="HTTP 503 Service Unavailable"),
    })
    write_json_atomic(layout.delivery_record(done.job_id), delivery)
    return config, tmp_path / "data", done.job_id, failed.job_id, empty.job_id


def test_status_shows_values_destinations_and_headings_that_match_the_states(records):
    config, _, done, failed, empty = records
    state = json.loads(_cli(config, "status", "--json").stdout)
    assert state["jobs"] == {"done": 1, "failed": 1, "no-result": 1}
    assert list(state["failed_jobs"]) == [failed] and list(state["no_result_jobs"]) == [empty]
    result = state["results"][done]
    assert result["values"]["segments"]["Brain"]["volume_ml"] == 1234.5
    assert result["summary"] == "Brain 1234.5 mL, mean 412; Subject Age 42; Finding: Yes (score 0.91)"
    assert result["delivered_to"] == "orthanc (delivered), pacs (pending: HTTP 503 Service Unavailable)"
    table = _cli(config, "status")
    assert table.returncode == 0
    text = " ".join(table.stdout.split())
    assert f"failed {failed}" in text and f"no result {empty}" in text and f"no result {failed}" not in text
    assert "Brain 1234.5 mL" in text and "orthanc (delivered)" in text
    assert "no models configured" not in table.stderr + table.stdout  # status runs no model: nothing to announce


def test_the_status_page_shows_values_and_where_results_went(records):
    from pacsworker.ops_http import page

    _, data, done, _, _ = records
    html = page(Settings(storage={"data_dir": str(data)}), "serve")
    row = html[html.index(f"<td>{done}</td>"):]
    row = row[:row.index("</tr>")]
    assert "<td class='values'>Brain 1234.5 mL, mean 412; Subject Age 42; Finding: Yes (score 0.91)</td>" in row
    assert "<td class='destinations'>orthanc (delivered), pacs (pending: HTTP 503 Service Unavailable)</td>" in row


def test_a_job_record_holds_each_segments_volume(dicom_dir):
    from pacsworker.worker.runtime import run_model

    outcome = run_model(sorted((dicom_dir / CT06).glob("*.dcm")), Settings().model("ct-body"))
    segments = outcome.values["segments"]
    assert outcome.statistics and set(segments) == {stat.spec.name for stat in outcome.statistics}
    for stat in outcome.statistics:
        assert segments[stat.spec.name]["volume_ml"] == pytest.approx(stat.volume_ml, abs=0.01)
        assert segments[stat.spec.name]["unit"] == "HU"


def test_an_unknown_model_name_lists_the_configured_ones_and_the_nearest(tmp_path, dicom_dir):
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")})
    result = _cli(config, "run", str(dicom_dir / CT06), "--model", "ct-bodi", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    said = " ".join(result.stderr.split())
    assert "no model named 'ct-bodi'" in said and "configured: ct-body" in said and "did you mean 'ct-body'?" in said


def test_run_names_the_series_of_a_folder_holding_two(tmp_path, dicom_dir):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in (CT02, CT04):
        for path in (dicom_dir / name).glob("*.dcm"):
            (folder / f"{name}-{path.name}").symlink_to(path)
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")})
    result = _cli(config, "run", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 3
    said = " ".join(result.stderr.split())
    assert "2 series found: " in said and "planes differ in size" not in said
    assert f"{CT02_SERIES} (" in said and "28 instance(s))" in said
    assert f"{CT04_SERIES} (" in said and "1 instance(s))" in said
    assert said.index(CT02_SERIES) < said.index(CT04_SERIES)  # the larger first


def test_run_help_documents_its_exit_codes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pacsworker", "run", "--help"], capture_output=True, text=True,
                            timeout=60, env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"})
    text = " ".join(result.stdout.split())
    assert "Exit codes:" in text
    for code, words in ((3, "no result"), (4, "the model failed"), (5, "failed validation"), (6, "withheld")):
        assert f"{code} " in text and words in text


def test_replay_says_why_it_could_not_send(tmp_path, dicom_dir):
    from pacsworker.scp.server import Receiver

    files = [dicom_dir / CT06]
    closed = free_port()
    with pytest.raises(ConnectionError, match=f"connection refused at 127.0.0.1:{closed}"):
        replay(files, "127.0.0.1", closed, "PACSWORKER")
    settings = Settings(scp={"host": "127.0.0.1", "port": free_port(), "allowed_calling_aets": ["MODALITY"]},
                        storage={"data_dir": str(tmp_path / "data")})
    receiver = Receiver(settings, lambda record: None)
    receiver.start()
    try:
        with pytest.raises(ConnectionError, match="rejected \\(permanent\\) by the service user: Calling AE title not "
                                                  "recognised"):
            replay(files, "127.0.0.1", settings.scp.port, "PACSWORKER", "INTRUDER")
        settings.storage.min_free_bytes = shutil.disk_usage(tmp_path).free + (1 << 30)  # a full disk
        report = replay(files, "127.0.0.1", settings.scp.port, "PACSWORKER", "MODALITY")
        assert report.sent == 0 and len(report.failed) == 3
        assert {reason for _, reason in report.failed} == {"status 0xA700 (Refused: Out of Resources)"}
    finally:
        receiver.stop()
