"""Flower, Celery's web monitor, on both brokers: it lists the workers and each series' job by its job id.

``pacsworker flower`` as the README gives it, with Flower's own ``--basic-auth`` passed through (its
HTTP API answers only with authentication), against ``pacsworker serve`` on the embedded broker and
against ``pacsworker scp`` + ``pacsworker worker`` on Redis.
"""

from __future__ import annotations

import base64
import json
import signal
import urllib.request
from pathlib import Path

from conftest import (
    Pacsworker,
    free_port,
    port_open,
    status_json,
    storescu,
    wait_until,
    write_config,
)

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
CT02_SERIES = "1.3.46.670589.33.1.6002432791750815306.26862469513794233732"
AUTH = "operator:secret"


def _config(tmp: Path, port: int, database_url: str = "", **queue) -> Path:
    return write_config(
        tmp / "pacsworker.yaml",
        scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 2},
        storage={"data_dir": str(tmp / "data"), **({"database_url": database_url} if database_url else {})},
        queue=queue,
        models=[{"name": "ct-body", "kind": "builtin"}],
        destinations=[{"kind": "folder", "name": "results", "path": str(tmp / "results")}],
    )


def _flower(tmp: Path, config: Path, port: int) -> Pacsworker:
    return Pacsworker(["flower", "--port", str(port), "--address=127.0.0.1", f"--basic-auth={AUTH}"],
                      config, tmp / "flower.log")


def _api(port: int, path: str):
    """Flower's HTTP API as an operator's script calls it; None until Flower answers."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={
        "Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def _roles(workers: dict) -> set[str]:
    return {name.partition("@")[0] for name in workers}


def watch_a_job(flower_port: int, scp_port: int, config: Path, dicom_dir: Path, roles: set[str]) -> dict:
    """What an operator checks in Flower: the workers, then the series' job and its delivery; returns the job's task."""
    online = wait_until(lambda: (w := _api(flower_port, "/api/workers?status=true")) and _roles(w) == roles and w,
                        60, what=f"Flower to list the workers {sorted(roles)} from their heartbeats")
    assert all(online.values()), online

    def inspected():  # a worker that missed an inspect reply's timeout is listed without that part
        workers = _api(flower_port, "/api/workers?refresh=true") or {}
        return _roles(workers) == roles and all("registered" in w for w in workers.values()) and workers

    registered = wait_until(inspected, 30, what="Flower to inspect the workers")
    assert all("pacsworker.process_series" in worker["registered"] for worker in registered.values())

    sent = storescu(scp_port, dicom_dir / CT02)
    assert sent.returncode == 0, sent.stderr

    def finished():
        tasks = _api(flower_port, "/api/tasks") or {}
        done = [t for t in tasks.values() if t["state"] == "SUCCESS"]
        return {t["name"] for t in done} == {"pacsworker.process_series", "pacsworker.deliver"} and tasks

    tasks = wait_until(finished, 120, what="Flower to show the job and its delivery succeeded")
    [job_id] = status_json(config)["series_jobs"][CT02_SERIES]["jobs"]
    job = tasks[job_id]  # Flower lists the job under its job id
    assert job["name"] == "pacsworker.process_series" and job["state"] == "SUCCESS"
    assert job["args"] == repr((job_id,))
    assert job["sent"] is not None, "the receiver's send event is missing"
    assert job["routing_key"] == "model.ct-body"
    [delivery] = [t for t in tasks.values() if t["name"] == "pacsworker.deliver"]
    assert delivery["root_id"] == job_id and delivery["routing_key"] == "delivery"
    return job


def test_flower_on_the_embedded_broker(tmp_path, dicom_dir):
    port, flower_port = free_port(), free_port()
    config = _config(tmp_path, port)
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    flower = None
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        flower = _flower(tmp_path, config, flower_port)
        job = watch_a_job(flower_port, port, config, dicom_dir, {"model", "delivery"})
        assert job["worker"].startswith("model@")
        assert "Traceback" not in flower.output()
    finally:
        for proc in (flower, serve):
            if proc is not None:
                proc.stop()


def test_a_stopped_flower_leaves_no_event_queue_in_the_embedded_broker(tmp_path):
    port, flower_port = free_port(), free_port()
    config = _config(tmp_path, port, event_queue_expires_seconds=10)
    broker = tmp_path / "data" / "broker"
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    flower = None

    def event_queues() -> list[str]:
        table = broker / "control" / "celeryev.exchange"
        return [queue for _, _, queue in json.loads(table.read_text())] if table.exists() else []

    def queued_events() -> list[Path]:
        return list(broker.glob("*.celeryev.*.msg"))

    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        flower = _flower(tmp_path, config, flower_port)
        wait_until(lambda: _roles(_api(flower_port, "/api/workers?status=true") or {}) == {"model", "delivery"}, 60,
                   what="Flower to list the workers")
        assert len(event_queues()) == 1  # Flower's own event queue, which the workers write to
        flower.kill(signal.SIGKILL)  # gone without a word, as after a crash
        wait_until(queued_events, 30, what="heartbeats to pile up for the stopped Flower")
        # the workers drop a queue nobody has read for queue.event_queue_expires_seconds (10 s here)
        wait_until(lambda: not event_queues() and not queued_events(), 60,
                   what="the stopped Flower's event queue to be removed")
        # a Flower killed while writing a control message can leave it cut short: Celery logs that
        # message's decoding error and goes on; no worker may have died of it
        assert "worker exited" not in serve.output()
    finally:
        for proc in (flower, serve):
            if proc is not None:
                proc.stop()


def test_flower_on_redis(tmp_path, dicom_dir, redis_url, database_url):
    port, flower_port = free_port(), free_port()
    config = _config(tmp_path, port, database_url=database_url, broker_url=redis_url)
    receiver = Pacsworker(["scp"], config, tmp_path / "scp.log")
    worker = flower = None
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        worker = Pacsworker(["worker", "--name", "gpu0@%h"], config, tmp_path / "worker.log")
        flower = _flower(tmp_path, config, flower_port)
        job = watch_a_job(flower_port, port, config, dicom_dir, {"gpu0"})
        assert job["worker"].startswith("gpu0@")
        # the broker view (queue lengths) needs Redis
        lengths = {q["name"]: q["messages"] for q in _api(flower_port, "/api/queues/length")["active_queues"]}
        assert lengths == {"model.ct-body": 0, "delivery": 0}
        assert "Traceback" not in flower.output()
    finally:
        for proc in (flower, worker, receiver):
            if proc is not None:
                proc.stop()
