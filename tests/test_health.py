"""/healthz and /readyz of the operator port: a stopped part of the receiver turns health red and is
named; readiness asks each destination what delivery will ask (a C-ECHO with the configured AE titles,
an authenticated DICOMweb request) and reuses the answer for metrics.ready_cache_seconds."""

from __future__ import annotations

import json
import socketserver

import requests
from conftest import Orthanc, free_port, missing
from test_delivery import PASSWORD, USER, pacs  # noqa: F401 - a real Orthanc with basic auth

from pacsworker.config import Settings
from pacsworker.ops_http import health, readiness, start_ops_server, watch
from pacsworker.scp.server import Receiver


def test_healthz_names_a_receiver_listener_that_stopped(tmp_path):
    port, stow_port, metrics_port = free_port(), free_port(), free_port()
    settings = Settings(scp={"host": "127.0.0.1", "port": port, "stow_port": stow_port},
                        storage={"data_dir": str(tmp_path / "data")},
                        metrics={"host": "127.0.0.1", "port": metrics_port})
    receiver = Receiver(settings, lambda record: None)
    receiver.start()
    ops = start_ops_server(settings, "scp")
    unwatch = watch(receiver.parts)
    try:
        url = f"http://127.0.0.1:{metrics_port}/healthz"
        healthy = requests.get(url, timeout=10)
        assert (healthy.status_code, healthy.text) == (200, "ok\n")
        # the DICOM acceptor's loop ends as if its thread had died (its socket stays open); the rest goes on
        socketserver.BaseServer.shutdown(receiver._servers[0])
        sick = requests.get(url, timeout=10)
        assert sick.status_code == 503
        assert sick.text == f"receiver listener 127.0.0.1:{port}: stopped accepting connections\n"
    finally:
        unwatch()
        ops.shutdown()
        receiver.stop()
    assert receiver.parts()["receiver series completion"] == "thread stopped"


class PickyOrthanc(Orthanc):
    """Orthanc that answers C-ECHO only from the calling AE titles it knows, to its own AE title."""

    def __init__(self, workdir):
        super().__init__(workdir)
        config = json.loads(self.config.read_text())
        config.update(DicomAlwaysAllowEcho=False, DicomCheckCalledAet=True,
                      DicomModalities={"pacsworker": ["PACSWORKER", "127.0.0.1", free_port()]})
        self.config.write_text(json.dumps(config))


def test_readyz_asks_each_destination_what_delivery_will_ask(tmp_path, pacs):  # noqa: F811
    picky = PickyOrthanc(tmp_path / "orthanc").start()
    password = tmp_path / "password"
    password.write_text("not-the-password\n")
    dimse = {"kind": "dimse", "host": "127.0.0.1", "port": picky.dicom_port, "ae_title": "ORTHANC"}
    destinations = [
        {**dimse, "name": "known"},
        {**dimse, "name": "stranger", "calling_ae_title": "STRANGER"},
        {**dimse, "name": "wrong-called", "ae_title": "NOTORTHANC"},
        {"kind": "dicomweb", "name": "web", "url": pacs.dicomweb_url,
         "auth": {"kind": "basic", "username": USER, "password_file": str(password)}},
    ]
    try:
        def ready(cache_seconds: float) -> dict[str, str]:
            settings = Settings(storage={"data_dir": str(tmp_path / "data")}, destinations=destinations,
                                metrics={"ready_cache_seconds": cache_seconds})
            return readiness(settings, "worker")

        checks = ready(3600)
        assert checks["destination known"] == "ok"
        assert checks["destination stranger"] == (
            f"C-ECHO to ORTHANC@127.0.0.1:{picky.dicom_port}: the PACS aborted the association at the C-ECHO (does it "
            "accept calling AE title STRANGER?)")
        # Orthanc rejects an unknown called AE title and closes at once: pynetdicom reads the rejection, or
        # (when the close wins the race) finds the association aborted; either way delivery would fail
        wrong_called = checks["destination wrong-called"]
        assert ("rejected" in wrong_called or "no association" in wrong_called) and "NOTORTHANC" in wrong_called
        assert "HTTP 401" in checks["destination web"] and "credentials refused" in checks["destination web"]
        assert "not-the-password" not in json.dumps(checks)

        password.write_text(PASSWORD + "\n")  # the operator fixes the password
        assert ready(3600)["destination web"] == checks["destination web"]  # the answer is reused for a while
        assert ready(0)["destination web"] == "ok"  # and asked again after it
    finally:
        picky.stop()


def test_healthz_names_the_ledger_when_its_database_stops(tmp_path):
    from postgres_server import PostgresServer, binaries

    if binaries() is None:
        missing("PostgreSQL (Debian: postgresql; /usr/lib/postgresql/*/bin/postgres)")
    server = PostgresServer(binaries()).start()
    try:
        settings = Settings(storage={"data_dir": str(tmp_path / "data"), "database_url": server.create_database()})
        assert health(settings, "scp") == {"ledger": "ok"}
    finally:
        server.stop()
    state = health(settings, "scp")["ledger"]
    assert state.startswith("not reachable: OperationalError: "), state
