"""kind triton: the spleen UNet served by a real Triton Inference Server, against kind torchscript.

The server is pytriton's Triton (2.51, on CPU) in its own venv (scripts/install-triton-test.sh),
run by tests/triton_server.py on loopback ports picked here. The worker runs the same MONAI
pipeline as tests/test_torchscript.py's sliding-window case; only the network is on the server,
so the mask must equal the in-process TorchScript mask voxel for voxel.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dciodvfy_errors, free_port, missing, pacsworker_run, wait_until, write_config
from test_torchscript import CT02, PIPELINES, POST, PRE, SPLEEN

from pacsworker.config import ModelSettings
from pacsworker.replay import collect_files
from pacsworker.worker.adapters import load_model
from pacsworker.worker.adapters.triton import TensorSpec
from pacsworker.worker.outputs import ModelRunError
from pacsworker.worker.series import Series
from pacsworker.worker.volume import load_series

TRITON_VENV = Path(os.environ.get("PACSWORKER_TRITON_VENV", Path.home() / ".cache" / "pacsworker" / "triton-venv"))
SERVER_SCRIPT = Path(__file__).with_name("triton_server.py")
START_TIMEOUT_S = 240  # the server binary, its Python backend and the model load; ~15 s here, slower under load
RESIZE, INFERER = PIPELINES["sliding-window"]
SPLEEN_SEGMENT = {"label": 1, "name": "Spleen", "category": ["SCT", "123037004", "Anatomical Structure"],
                  "type": ["SCT", "78961009", "Spleen"]}


class TritonServer:
    """tests/triton_server.py from the Triton venv, serving the spleen network as model ``spleen`` version 1."""

    def __init__(self, workdir: Path, max_batch_size: int = 1):
        python = TRITON_VENV / "bin" / "python"
        if not python.is_file():
            missing(f"the Triton test venv {TRITON_VENV} (scripts/install-triton-test.sh)")
        self.python, self.workdir, self.max_batch_size = python, workdir, max_batch_size
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def start(self) -> "TritonServer":
        """Start it and return at once: readiness is the caller's to wait for (or not)."""
        self.log = self.workdir / "triton.log"
        self.proc = subprocess.Popen(
            [str(self.python), str(SERVER_SCRIPT), "--network", str(SPLEEN), "--name", "spleen", "--version", "1",
             "--max-batch-size", str(self.max_batch_size), "--http-port", str(self.http_port),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
        )
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/models/spleen/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self) -> "TritonServer":
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the Triton server exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            return self.ready()

        wait_until(up, START_TIMEOUT_S, interval=0.5, what="Triton to serve model spleen")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGINT)  # pytriton's way to stop: it stops tritonserver and its stubs
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (tritonserver, backend stubs)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class BusyGateway:
    """An HTTP proxy in front of the server, as a load balancer is, that answers the first ``busy``
    inference requests with 503 Service Unavailable and forwards everything else."""

    def __init__(self, upstream: str, busy: int):
        gateway = self
        self.upstream, self.busy, self.refused, self.forwarded = upstream, busy, 0, 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if self.command == "POST" else None
                if self.path.endswith("/infer") and gateway.refused < gateway.busy:
                    gateway.refused += 1
                    return self._answer(503, {"Content-Type": "application/json"}, b'{"error":"busy"}')
                gateway.forwarded += self.path.endswith("/infer")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                request = urllib.request.Request(gateway.upstream + self.path, body, headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=120) as resp:
                        self._answer(resp.status, resp.headers, resp.read())
                except urllib.error.HTTPError as err:
                    self._answer(err.code, err.headers, err.read())

            def _answer(self, status, headers, body):
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """One server for the module, started here and not waited for: the first test that needs it
    ready waits; test_a_server_coming_up_during_the_wait_is_used runs its job while it starts."""
    if not SPLEEN.is_file():
        pytest.skip(f"{SPLEEN} absent")
    server = TritonServer(tmp_path_factory.mktemp("triton")).start()
    yield server
    server.stop()


@pytest.fixture
def served(triton) -> TritonServer:
    return triton.wait_ready()


@pytest.fixture(scope="module")
def ct02(dicom_dir) -> Series:
    return Series(load_series(collect_files([dicom_dir / CT02])))


@pytest.fixture(scope="module")
def torchscript_labels(ct02) -> np.ndarray:
    """The reference: kind torchscript, in this process, with the same pipeline."""
    if not SPLEEN.is_file():
        pytest.skip(f"{SPLEEN} absent")
    labels = load_model(spleen_settings(kind="torchscript", source=str(SPLEEN))).run(ct02).label_maps[0].array
    assert labels.sum() > 0, "the network should mark something for the comparison to mean anything"
    return labels


def spleen_settings(**fields) -> ModelSettings:
    return ModelSettings(
        name="spleen", device="cpu", pipeline={"pre": PRE + RESIZE, "inferer": INFERER, "post": POST},
        outputs={"seg": {"kind": "labelmap", "segments": [SPLEEN_SEGMENT]}}, **fields,
    )


def triton_settings(url: str, **fields) -> ModelSettings:
    # nothing about tensors: their names, types and shapes are the server's to say
    return spleen_settings(kind="triton", url=url, model_name=fields.pop("model_name", "spleen"), **fields)


def assert_same_labels(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    assert np.array_equal(ours, reference), f"{int((ours != reference).sum())} voxels differ"


def test_a_server_coming_up_during_the_wait_is_used(triton, ct02, torchscript_labels, caplog):
    """The job starts while Triton is still starting (or restarting): it waits for the model, then runs."""
    if triton.ready():  # the server is up already (another test ran first): restart it on the same ports
        triton.stop()
        triton.start()
    assert not triton.ready()
    model = load_model(triton_settings(triton.grpc_url, wait_seconds=START_TIMEOUT_S))  # loading needs no server
    caplog.set_level(logging.WARNING, logger="pacsworker.worker")
    started = time.monotonic()
    try:
        labels = model.run(ct02).label_maps[0].array
    except ModelRunError as exc:
        raise AssertionError(f"{exc}\nserver log:\n{triton.output()[-3000:]}") from exc
    assert any("waiting up to" in r.getMessage() for r in caplog.records), "the job should have waited for Triton"
    assert time.monotonic() - started > 1
    assert_same_labels(labels, torchscript_labels)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_mask_equals_torchscript_and_tensors_come_from_metadata(served, ct02, torchscript_labels, protocol):
    model = load_model(triton_settings(served.http_url if protocol == "http" else served.grpc_url))
    result = model.run(ct02)
    assert_same_labels(result.label_maps[0].array, torchscript_labels)
    # the server's tensor names and its batch limit (1: the inferer's pairs of tiles go one by one)
    assert model.network.served.input == TensorSpec("ct_tiles", "FP32", (-1, 1, -1, -1, -1))
    assert model.network.served.output == TensorSpec("spleen_logits", "FP32", (-1, 2, -1, -1, -1))
    assert model.network.served.max_batch_size == 1
    assert model.identity.version == "spleen 1"


def test_pacsworker_run_writes_the_seg(served, dicom_dir, tmp_path, torchscript_labels):
    """As a user runs it: `pacsworker run` with a triton model in the configuration."""
    config = write_config(
        tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")},
        models=[triton_settings(served.http_url).model_dump(mode="json", exclude_defaults=True)],
    )
    result = pacsworker_run(dicom_dir / CT02, tmp_path / "out", config, "spleen")
    assert result.returncode == 0, result.stderr[-3000:]
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Spleen"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "spleen 1"
    assert int(seg.pixel_array.astype(bool).sum()) == int(torchscript_labels.sum())
    assert dciodvfy_errors(tmp_path / "out" / "seg.dcm") == []


def test_a_request_answered_503_is_sent_again(served, ct02, torchscript_labels, caplog):
    gateway = BusyGateway(served.http_url, busy=2)
    try:
        caplog.set_level(logging.WARNING, logger="pacsworker.worker")
        labels = load_model(triton_settings(gateway.url)).run(ct02).label_maps[0].array
    finally:
        gateway.close()
    assert gateway.refused == 2 and gateway.forwarded > 0
    assert sum("503: busy; trying again" in r.getMessage() for r in caplog.records) == 2
    assert_same_labels(labels, torchscript_labels)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_a_server_that_is_down_fails_the_run_after_the_wait(ct02, scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    model = load_model(triton_settings(url, wait_seconds=2))
    started = time.monotonic()
    with pytest.raises(ModelRunError) as raised:
        model.run(ct02)
    assert 2 <= time.monotonic() - started < 15
    assert str(raised.value) == f"Triton at {url} unreachable for 2 s (model spleen): connection refused"


@pytest.mark.parametrize(("protocol", "name", "version", "reason"), [
    ("http", "liver", "", "model liver not ready on Triton at {url} after 1 s: "
                          "404: Request for unknown model: 'liver' is not found"),
    ("grpc", "spleen", "7", "model spleen (version 7) not ready on Triton at {url} after 1 s: "
                            "StatusCode.NOT_FOUND: Request for unknown model: 'spleen' version 7 is not found"),
])
def test_a_model_the_server_does_not_have_fails_the_run_naming_it(served, ct02, protocol, name, version, reason):
    url = served.http_url if protocol == "http" else served.grpc_url
    model = load_model(triton_settings(url, model_name=name, model_version=version, wait_seconds=1))
    with pytest.raises(ModelRunError) as raised:
        model.run(ct02)
    assert str(raised.value) == reason.format(url=url)
