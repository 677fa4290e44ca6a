"""Real parts for the tests: Redis, Orthanc with DICOMweb, DCMTK storescu, dciodvfy, pacsworker processes.

Servers listen on loopback ports picked here. With PACSWORKER_REQUIRE_SERVERS=1 (the README's test
command sets it) a missing server is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DICOM_DIR = Path(os.environ.get("PACSWORKER_TEST_DICOM", REPO.parent / "shared" / "dicom"))
STORESCU = "/usr/bin/storescu"  # a venv's pynetdicom ships its own storescu script: use DCMTK's by path
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def missing(what: str) -> None:
    if os.environ.get("PACSWORKER_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{what} is required for this test run but missing")
    pytest.skip(f"{what} not installed (run the README's test command to install it)")


def require_tool(path: str) -> str:
    found = shutil.which(path)
    if not found:
        missing(path)
    return found


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    if not (DICOM_DIR / "catalog.json").is_file():
        pytest.skip(f"test DICOM folder {DICOM_DIR} absent (set PACSWORKER_TEST_DICOM to its path)")
    return DICOM_DIR


def docs_images(name: str) -> list[Path]:
    """Where a test also saves a picture for the documentation: ``docs/images/<name>`` when
    PACSWORKER_DOCS_IMAGES=1 (``scripts/docs-images.sh``), else nowhere. The pictures in the docs are
    made by the tests that check what they show, never by hand."""
    return [REPO / "docs" / "images" / name] if os.environ.get("PACSWORKER_DOCS_IMAGES") == "1" else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def storescu(port: int, *folders: Path, aec: str = "PACSWORKER", aet: str = "MODALITY") -> subprocess.CompletedProcess:
    require_tool(STORESCU)
    return subprocess.run(
        [STORESCU, "-aet", aet, "-aec", aec, "+sd", "+r", "-R", "127.0.0.1", str(port), *map(str, folders)],
        capture_output=True, text=True, timeout=120,
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's report that are errors (it writes its report on stderr)."""
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("Error")]


class Orthanc:
    """A real Orthanc with the DICOMweb plugin; can be stopped and restarted on the same port and storage."""

    def __init__(self, workdir: Path):
        if not Path(ORTHANC).exists() or not Path(DICOMWEB_PLUGIN).exists():
            missing("Orthanc with its DICOMweb plugin (Debian: orthanc orthanc-dicomweb)")
        self.workdir = workdir
        self.http_port, self.dicom_port = free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "pacsworker-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> "Orthanc":
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=log)
        wait_until(self._alive, 30, what="Orthanc to answer")
        return self

    def _alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/system", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        wait_until(lambda: not port_open(self.http_port), 10, what="Orthanc to close its port")

    def get_json(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    def study_instances(self, study_uid: str) -> list[dict]:
        """QIDO-RS: the instances of a study, as DICOM JSON."""
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url=self.dicomweb_url)
        try:
            return client.search_for_instances(study_instance_uid=study_uid)
        except Exception:  # noqa: BLE001 - 404/204 until the study exists
            return []

    def instances_of_class(self, study_uid: str, sop_class: str) -> list[dict]:
        return [i for i in self.study_instances(study_uid) if i.get("00080016", {}).get("Value", [None])[0] == sop_class]

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str):
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=self.dicomweb_url).retrieve_instance(study_uid, series_uid, sop_uid)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if not binary:
        missing("redis-server")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: port_open(port), 15, what="redis-server")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=15)


class Pacsworker:
    """A ``pacsworker`` command running in its own process group, logging to a file."""

    def __init__(self, args: list[str], config: Path, log: Path, cwd: Path | None = None):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacsworker", *args, "--config", str(config)],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=cwd or log.parent,  # never the repository: nothing a command writes may land there
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the command and any worker children)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
        except ProcessLookupError:
            pass

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def echo_ok(port: int, aet: str = "SCU", aec: str = "PACSWORKER") -> bool:
    """A C-ECHO with pynetdicom: True when the association was accepted and the echo succeeded."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def pacsworker_run(folder: Path, out: Path, config: Path | None = None, model: str = "ct-body") -> subprocess.CompletedProcess:
    """``pacsworker run FOLDER --model MODEL --out OUT [--config CONFIG]`` as a user types it."""
    command = [sys.executable, "-m", "pacsworker", "run", str(folder), "--model", model, "--out", str(out)]
    return subprocess.run(command + (["--config", str(config)] if config else []), capture_output=True, text=True, timeout=600)


def write_config(path: Path, **sections) -> Path:
    """A YAML config of these sections; the metrics port stays off unless a test asks for it (fixed
    default ports would collide between tests)."""
    sections.setdefault("metrics", {"enabled": False})
    path.write_text(yaml.safe_dump(sections))
    return path


def status_json(config: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "pacsworker", "status", "--json", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def postgres_server():
    """Debian's PostgreSQL (tests/postgres_server.py), one per test session; each test asks it for a fresh database."""
    from postgres_server import PostgresServer, binaries

    bin_dir = binaries()
    if bin_dir is None:
        missing("PostgreSQL (Debian: postgresql; /usr/lib/postgresql/*/bin/postgres)")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture
def database_url(postgres_server) -> str:
    """A fresh database of the session's PostgreSQL, for ``storage.database_url``: the ledger of roles
    that run as on several hosts (the Redis end-to-end tests)."""
    return postgres_server.create_database("roles")


def ledger_of(data_dir: Path | str, database_url: str = ""):
    """The ledger that the roles of a test write (SQLite under ``data_dir``, or ``database_url``
    when the test set ``storage.database_url``): what the tests read state from."""
    from pacsworker.ledger import ledger_at, open_ledger

    if database_url:
        from pacsworker.config import Settings

        return open_ledger(Settings(storage={"data_dir": str(Path(data_dir).resolve()), "database_url": database_url}),
                           "test")
    return ledger_at(Path(data_dir).resolve(), "test")


def spool_series(folder: Path, data_dir: Path):
    """A series' files put into ``data_dir``'s spool as the receiver leaves them (one file per SOP
    Instance UID), with the record the receiver would make of it: (layout, record, first header)."""
    import shutil

    import pydicom

    from pacsworker.records import DataLayout, SeriesRecord
    from pacsworker.scp.tracker import content_digest

    source = sorted(p for p in folder.rglob("*") if p.is_file())
    first = pydicom.dcmread(source[0], stop_before_pixels=True)
    layout = DataLayout(data_dir).create()
    spool = layout.series_dir(str(first.SeriesInstanceUID))
    spool.mkdir(parents=True)
    uids = set()
    for path in source:
        uids.add(uid := str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        shutil.copy(path, spool / f"{uid}.dcm")
    record = SeriesRecord(series_uid=str(first.SeriesInstanceUID), study_uid=str(first.StudyInstanceUID), modality="CT",
                          sop_class_uid=str(first.SOPClassUID), instances=len(source), content_digest=content_digest(uids))
    return layout, record, first
