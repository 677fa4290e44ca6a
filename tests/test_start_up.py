"""What the processes say when they start and stop: the truth about who may send, where results go,
which validation runs, and which models can be used (each loaded before its first job)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from conftest import Pacsworker, echo_ok, free_port, ledger_of, port_open, status_json, storescu, wait_until, write_config

CT02 = "ct02_philips_ingenuity_headphantom_5mm"


def _flat(text: str) -> str:
    return " ".join(text.split())  # the console wraps long lines


def _stop(process: Pacsworker) -> str:
    """SIGTERM to the process group, as systemd and the tests do; the output once it ended."""
    process.kill(signal.SIGTERM)
    return process.output()


def test_serve_says_who_may_send_where_results_go_and_that_it_stopped(tmp_path, dicom_dir):
    port, metrics_port = free_port(), free_port()
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml", scp={"port": port, "host": "0.0.0.0", "series_quiet_seconds": 1},
        storage={"data_dir": str(data)}, metrics={"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        models=[{"name": "ct-body"}],
    )
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, dicom_dir / CT02).returncode == 0
        wait_until(lambda: "results delivered" in serve.output(), 180, what="the job's results line")
    finally:
        output = _stop(serve)
    banner = _flat(output.partition("pacsworker serve")[2].partition("results to")[0])
    assert f"DICOM PACSWORKER on 0.0.0.0:{port} (every interface); accepts any calling AE title" in banner
    assert f"status http://127.0.0.1:{metrics_port}/" in banner and "no login" in banner
    assert f"broker embedded (filesystem, {data / 'broker'})" in banner
    assert f"ledger SQLite {data / 'ledger.sqlite3'} (series, jobs, deliveries, history)" in banner
    assert "validator dciodvfy (" in banner
    assert f"results to results (folder {data / 'results'}/" in _flat(output)
    assert "results to nowhere" not in output
    # Celery's lines that read like a masked password, or name a node no one configured, are ours instead
    assert "Connected to filesystem://" not in output and ":**@" not in output
    assert "model@" not in output.replace("worker model@", "") and "succeeded in" not in output
    assert "worker model@" in output and "ready: consuming model.ct-body" in _flat(output)
    # one line per job says where its results went
    [job] = status_json(config)["series_jobs"].popitem()[1]["jobs"]
    study = ledger_of(data).job(job).study_uid
    written = len(list((data / "results" / study).rglob("*.dcm")))  # the SEG and its SRs
    assert written >= 2
    assert (f"job {job}: results delivered: {written} instance(s) to results (folder {data / 'results'}/{study}/)"
            in _flat(output))
    # a clean stop says so, last; Celery's own shutdown words are not repeated per process
    assert output.rstrip().splitlines()[-1].endswith("pacsworker stopped")
    assert "Warm shutdown" not in output and "Hitting Ctrl+C" not in output


def test_a_worker_without_dciodvfy_says_its_gate_checks_no_iod(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # the venv's programs, no dicom3tools
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")})
    worker = Pacsworker(["worker", "--queues", "delivery", "--metrics-port", "0"], config, tmp_path / "worker.log")
    try:
        wait_until(lambda: "ready" in worker.output() or worker.proc.poll() is not None, 90, what="the worker")
    finally:
        output = _stop(worker)
    assert "validator none (install dicom3tools)" in _flat(output)
    assert f"broker embedded (filesystem, {tmp_path / 'data' / 'broker'})" in _flat(output)
    assert "Connected to filesystem://" not in output
    assert output.rstrip().splitlines()[-1].endswith("pacsworker stopped")


def _broken_models(tmp_path: Path, triton_port: int) -> list[dict]:
    raising = tmp_path / "raises_on_import.py"
    raising.write_text("import numpy\n\n\ndef _weights():\n    raise ValueError('weights.pt is not a checkpoint')\n\n\n"
                       "WEIGHTS = _weights()\n\n\nclass Model:\n    def predict(self, series):\n        return {}\n")
    return [
        {"name": "missing", "kind": "python", "source": f"{tmp_path / 'no_such_file.py'}:Nothing"},
        {"name": "unimportable", "kind": "python", "source": f"{raising}:Model"},
        {"name": "torchless", "kind": "torchscript", "source": str(tmp_path / "absent.ts")},
        {"name": "remote", "kind": "triton", "url": f"http://127.0.0.1:{triton_port}", "model_name": "spleen",
         "wait_seconds": 1, "match": {"modalities": ["MR"]}},
    ]


def test_serve_loads_every_model_at_start_and_serves_the_usable_ones(tmp_path, dicom_dir):
    port, triton_port = free_port(), free_port()  # nothing listens on the Triton port
    config = write_config(
        tmp_path / "c.yaml", scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 1},
        storage={"data_dir": str(tmp_path / "data")}, queue={"heartbeat_seconds": 1},
        models=[{"name": "ct-body"}, *_broken_models(tmp_path, triton_port)],
    )
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: "model remote " in serve.output(), 120, what="every model's start-up line")
        output = _flat(serve.output())
        # before any job: one line per model, usable or why not
        assert "model ct-body usable: builtin, loaded on cpu" in output
        assert "model missing NOT usable" in output and "no_such_file.py does not exist" in output
        assert "model unimportable NOT usable" in output and "ValueError: weights.pt is not a checkpoint" in output
        assert f'File "{tmp_path / "raises_on_import.py"}", line 5, in _weights' in serve.output()
        assert "model torchless NOT usable" in output and "absent.ts" in output
        assert f"model remote usable: triton server at http://127.0.0.1:{triton_port}, not reachable now" in output
        assert "NO MODEL CAN BE USED" not in output
        # the usable model serves, warm; the others' jobs fail at once with the reason said at start
        assert storescu(port, dicom_dir / CT02).returncode == 0
        wait_until(lambda: status_json(config)["jobs"].get("done") == 1 and status_json(config)["jobs"].get("failed") == 3,
                   180, what="ct-body's job done, the three broken models' jobs failed")
        reasons = " ".join(status_json(config)["failed_jobs"].values())
        assert "does not exist" in reasons and "weights.pt is not a checkpoint" in reasons and "absent.ts" in reasons
        assert "model ct-body loaded on" not in serve.output(), "the job used the model loaded at start"
    finally:
        serve.stop()


def test_serve_with_no_usable_model_still_receives_and_says_so(tmp_path, dicom_dir):
    port = free_port()
    config = write_config(
        tmp_path / "c.yaml", scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 1},
        storage={"data_dir": str(tmp_path / "data")},
        models=[{"name": "missing", "kind": "python", "source": f"{tmp_path / 'no_such_file.py'}:Nothing"}],
    )
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: "NO MODEL CAN BE USED" in serve.output(), 120, what="the no-model line")
        assert "the receiver still receives and keeps every series" in _flat(serve.output())
        assert echo_ok(port)
        assert storescu(port, dicom_dir / CT02).returncode == 0
        wait_until(lambda: status_json(config)["jobs"].get("failed") == 1, 120, what="the job to fail with the reason")
        [reason] = status_json(config)["failed_jobs"].values()
        assert "no_such_file.py does not exist" in reason
        assert len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == 28, "the series is kept"
    finally:
        serve.stop()


def test_scp_says_its_part_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "c.yaml", scp={"port": port, "host": "127.0.0.1",
                                                    "allowed_calling_aets": ["MODALITY"]},
                          storage={"data_dir": str(tmp_path / "data")})
    receiver = Pacsworker(["scp"], config, tmp_path / "scp.log")
    # its log, not a connection: a probe's own line could come after the last
    wait_until(lambda: f"listening on 127.0.0.1:{port}" in receiver.output(), 60, what="the receiver to listen")
    output = _flat(_stop(receiver))
    assert receiver.proc.returncode == 0
    assert f"DICOM PACSWORKER on 127.0.0.1:{port} (this host only); accepts calling AE titles MODALITY only" in output
    assert "status none (metrics.enabled: false)" in output
    assert "routes to ct-body" in output and "(the defaults: no models configured)" in output
    assert "no models configured: the defaults run" not in output  # said once, in the banner
    assert output.endswith("pacsworker stopped")
