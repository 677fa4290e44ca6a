"""What an operator reads when something is not as expected: `status` and the status page with each
job's values and destinations, headings that match the states, and the words of `run` and `replay`
when they cannot do what was asked (which model names exist, which series a folder holds, why a
peer could not be reached)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import docs_images, free_port, missing, write_config
from ledger_fill import deliver, fail_delivery, routed, run
from pacsworker.config import Settings
from pacsworker.ledger import Ledger, default_url
from pacsworker.replay import replay

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
CT04 = "ct04_philips_ingenuity_headphantom_scout"
CT06 = "ct06_ge_lightspeed_liver_3slice"
CT02_SERIES = "1.3.46.670589.33.1.6002432791750815306.26862469513794233732"
CT04_SERIES = "1.3.46.670589.33.1.17491953482334658115.21841165151607525240"


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsworker", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


BRAIN_VALUES = {"segments": {"Brain": {"volume_ml": 1234.5, "voxels": 1234500, "mean": 412.0, "sd": 80.1, "unit": ""}},
                "age": {"kind": "score", "name": ["DCM", "121033", "Subject Age"], "value": 42.0},
                "finding": {"kind": "classification", "name": ["DCM", "121071", "Finding"], "value": "yes",
                            "meaning": ["SCT", "373066001", "Yes"], "score": 0.91}}


@pytest.fixture
def records(tmp_path):
    """A ledger with a job delivering (values, delivered to one destination, pending at another), one
    failed and one without a result."""
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")})
    with Ledger.open(default_url(tmp_path / "data")) as ledger:
        done, failed, empty = routed(ledger, "1.2.3", "1.2", ["mr-brain", "broken", "ct-body"])
        results = {"seg.dcm": "1.2.3.9.1"}
        run(ledger, done, "delivering", values=BRAIN_VALUES, results=results, destinations=["orthanc", "pacs"])
        assert deliver(ledger, done, "orthanc", results) == "delivered"
        assert fail_delivery(ledger, done, "pacs", results, "HTTP 503 Service Unavailable") == "pending"
        run(ledger, failed, "failed", reason="model broken failed to load")
        run(ledger, empty, "no-result", reason="not-a-volume: 1 image plane(s)")
    return config, tmp_path / "data", done, failed, empty


def test_status_shows_values_destinations_and_headings_that_match_the_states(records):
    config, _, done, failed, empty = records
    state = json.loads(_cli(config, "status", "--json").stdout)
    assert state["jobs"] == {"delivering": 1, "failed": 1, "no-result": 1}
    assert state["series"] == {"queued": 1} and set(state["series_jobs"]["1.2.3"]["jobs"]) == {done, failed, empty}
    assert state["pending_deliveries"] == {done: {"pacs": "HTTP 503 Service Unavailable"}}
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


def test_the_status_page_reads_in_a_browser(records, tmp_path):
    """Chromium shows the status page as an operator sees it: the values and destinations in their cells."""
    from ohif_browser import Chromium, chromium_binary

    from pacsworker.ops_http import page

    binary = chromium_binary()
    if not binary:
        missing("Chromium (Debian: chromium)")
    _, data, done, failed, _ = records
    (data / "broker").mkdir(exist_ok=True)  # as serve makes it: the page's readiness is green
    html = tmp_path / "status.html"
    html.write_text(page(Settings(storage={"data_dir": str(data)}), "serve"))
    browser = Chromium(binary, tmp_path / "chromium", width=1400, height=900)
    try:
        browser.navigate(html.as_uri())
        shown = browser.wait_for("document.querySelector('td.values') && document.body.innerText", 30, "the page")
        assert "Brain 1234.5 mL, mean 412" in shown and "pacs (pending: HTTP 503 Service Unavailable)" in shown
        assert failed in shown and "model broken failed to load" in shown
        browser.screenshot(tmp_path / "status.png", *docs_images("status-page.png"))
    finally:
        browser.close()


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
