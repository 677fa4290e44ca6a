"""The operator's port of a running pacsworker: Prometheus metrics that count what happened,
health and readiness, and the status page in a real headless Chromium."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import Pacsworker, free_port, missing, port_open, status_json, storescu, wait_until, write_config
from ohif_browser import Chromium, chromium_binary
from prometheus_client.parser import text_string_to_metric_families

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
CT04 = "ct04_philips_ingenuity_headphantom_scout"
CT06 = "ct06_ge_lightspeed_liver_3slice"
CT02_SERIES = "1.3.46.670589.33.1.6002432791750815306.26862469513794233732"
CT04_SERIES = "1.3.46.670589.33.1.17491953482334658115.21841165151607525240"
CT06_SERIES = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
MODELS = Path(__file__).parent / "models"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, from the exposition format."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory, dicom_dir):
    """``pacsworker serve`` with its metrics port, after one CT series became results and one was skipped."""
    tmp = tmp_path_factory.mktemp("ops")
    port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp / "c.yaml", scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 1},
        storage={"data_dir": str(tmp / "data")}, metrics={"host": "127.0.0.1", "port": metrics_port},
        destinations=[{"kind": "folder", "name": "results", "path": str(tmp / "results")}],
    )
    (tmp / "results").mkdir()
    serve = Pacsworker(["serve"], config, tmp / "serve.log")
    try:
        wait_until(lambda: port_open(port) and port_open(metrics_port), 60, what="the receiver and its metrics port")
        assert storescu(port, dicom_dir / CT02, dicom_dir / CT04).returncode == 0
        wait_until(lambda: status_json(config)["jobs"] == {"done": 1}, 120, what="the job done and delivered")
        yield serve, f"http://127.0.0.1:{metrics_port}", tmp
    finally:
        serve.stop()


def test_metrics_count_what_happened_across_serve_processes(served):
    _, url, _ = served
    status, text = _get(f"{url}/metrics")
    assert status == 200
    values = _samples(text)
    # counted in the receiver
    assert values[("pacsworker_instances_received_total", (("calling_ae", "MODALITY"), ("via", "dimse")))] == 29
    assert values[("pacsworker_associations_total", (("calling_ae", "MODALITY"), ("outcome", "accepted")))] >= 1
    assert values[("pacsworker_series_completed_total", (("by", "quiet"),))] == 2
    assert values[("pacsworker_series_routed_total", (("outcome", "skipped"), ("reason", "too_few_instances")))] == 1
    assert values[("pacsworker_series_routed_total", (("outcome", "queued"), ("reason", "")))] == 1
    received = values[("pacsworker_received_bytes_total", (("calling_ae", "MODALITY"), ("via", "dimse")))]
    assert received > 14e6  # ct02's 28 slices of 512 x 512 alone
    # counted in the model worker (another process) and summed on this port
    assert values[("pacsworker_jobs_finished_total", (("model", "ct-body"), ("state", "results")))] == 1
    for stage in ("receive", "complete", "queued", "load", "model", "encode"):
        assert values[("pacsworker_stage_seconds_count", (("stage", stage),))] >= 1, stage
    assert values[("pacsworker_stage_seconds_sum", (("stage", "model"),))] > 0
    # counted in the delivery worker (a third process)
    assert values[("pacsworker_deliveries_total", (("destination", "results"), ("outcome", "delivered")))] == 1
    assert values[("pacsworker_stage_seconds_count", (("stage", "deliver"),))] == 1
    # read from the records and the embedded broker at the scrape
    assert values[("pacsworker_jobs", (("model", "ct-body"), ("state", "done")))] == 1
    assert values[("pacsworker_series", (("state", "done"),))] == 1
    assert values[("pacsworker_series", (("state", "skipped"),))] == 1
    assert values[("pacsworker_queue_depth", (("queue", "model.ct-body"),))] == 0
    assert values[("pacsworker_outbox_destinations", (("state", "dead-letter"),))] == 0


def test_health_and_readiness(served, tmp_path):
    _, url, tmp = served
    assert _get(f"{url}/healthz") == (200, "ok\n")
    status, body = _get(f"{url}/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True
    assert ready["checks"] == {"broker": "ok", "spool": "ok", "destination results": "ok"}
    assert _get(f"{url}/nothing-here")[0] == 404


def test_readiness_fails_with_the_reason_when_the_broker_is_down(tmp_path):
    port, metrics_port = free_port(), free_port()
    dead = free_port()  # nothing listens here
    config = write_config(
        tmp_path / "c.yaml", scp={"port": port, "host": "127.0.0.1"}, storage={"data_dir": str(tmp_path / "data")},
        queue={"broker_url": f"redis://127.0.0.1:{dead}/0", "publish_timeout_seconds": 1},
        metrics={"host": "127.0.0.1", "port": metrics_port},
    )
    scp = Pacsworker(["scp"], config, tmp_path / "scp.log")
    try:
        wait_until(lambda: port_open(metrics_port), 60, what="the metrics port")
        assert _get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 200  # up, though not ready
        status, body = _get(f"http://127.0.0.1:{metrics_port}/readyz")
        assert status == 503
        checks = json.loads(body)["checks"]
        assert checks["spool"] == "ok" and checks["broker"].startswith("broker unreachable: ")
    finally:
        scp.stop()


def test_status_page_in_a_browser_lists_series_and_jobs_with_state_and_reason(served, tmp_path):
    _, url, _ = served
    binary = chromium_binary()
    if not binary:
        missing("Chromium (Debian: chromium)")
    try:
        import websocket  # noqa: F401 - websocket-client, to speak the DevTools protocol
    except ImportError:
        missing("the websocket-client Python package (pip install -e '.[test]')")
    browser = Chromium(binary, tmp_path / "profile", width=1400, height=900)
    try:
        browser.navigate(f"{url}/")
        browser.wait_for("document.querySelectorAll('#jobs tr').length > 1", 30, what="the jobs table")
        rows = browser.evaluate(
            "Object.fromEntries(['series', 'jobs', 'readiness', 'queues'].map(id => [id, "
            "[...document.querySelectorAll('#' + id + ' tr')].slice(1).map(r => [...r.cells].map(c => c.innerText))]))"
        )
        series = {row[0]: row for row in rows["series"]}
        assert series[CT02_SERIES][5] == "done" and series[CT02_SERIES][3] == "28"
        assert series[CT04_SERIES][5] == "skipped" and "fewer than 10" in series[CT04_SERIES][7]
        [job] = rows["jobs"]
        assert job[0].startswith(f"ct-body_{CT02_SERIES}_") and job[1:3] == ["ct-body", "done"]
        assert ["broker", "ok"] in rows["readiness"] and ["model.ct-body", "0"] in rows["queues"]
        assert browser.console_errors() == []
        browser.screenshot(tmp_path / "status.png")
    finally:
        browser.close()


def test_status_shows_the_receiver_series_receiving_and_running_jobs_with_their_stage(tmp_path, dicom_dir):
    hold = tmp_path / "hold"
    hold.touch()
    code = ["SCT", "272673000", "Bone"]
    model = {"name": "bones", "kind": "python", "source": f"{MODELS / 'switchable.py'}:Switchable",
             "options": {"hold_while": str(hold)},
             "outputs": {"bone": {"kind": "labelmap", "segments": [{"label": 1, "name": "Bone", "category": code,
                                                                     "type": code}]}}}
    port = free_port()
    config = write_config(
        tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")}, models=[model],
        scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 3600, "complete_on_release": ["SCANNER"]},
        destinations=[{"kind": "folder", "name": "results", "path": str(tmp_path / "results")}],
    )
    (tmp_path / "results").mkdir()
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, dicom_dir / CT02, aet="SCANNER").returncode == 0  # complete on release
        assert storescu(port, dicom_dir / CT06, aet="WORKSTATION").returncode == 0  # receiving for an hour
        state = wait_until(lambda: (s := status_json(config))["running_jobs"]
                           and next(iter(s["running_jobs"].values()))["stage"] == "model" and s, 120,
                           what="the job running its model")
        [(job_id, running)] = state["running_jobs"].items()
        assert job_id.startswith(f"bones_{CT02_SERIES}_") and running["model"] == "bones" and running["attempt"] == 1
        [(name, receiver)] = state["receivers"].items()
        assert name.startswith("PACSWORKER@") and receiver["state"] == "up" and receiver["ports"]["dimse"] == port
        # the receiver's heartbeat (every few seconds) lists the series with what has arrived by then
        expected = {CT06_SERIES: {"instances": 3, "calling_aet": "WORKSTATION", "modality": "CT"}}
        wait_until(lambda: status_json(config)["receiving"] == expected, 30,
                   what="the receiver's heartbeat to list the series with its 3 instances")
        assert state["queue_depth"] == {"model.bones": 0, "delivery": 0}
        hold.unlink()
        wait_until(lambda: status_json(config)["jobs"] == {"done": 1}, 60, what="the job to finish")
        assert status_json(config)["running_jobs"] == {}
    finally:
        serve.stop()
