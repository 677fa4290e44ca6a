"""DICOM TLS: DCMTK's storescu over TLS with certificates the test makes, and peers that fail it."""

from __future__ import annotations

import logging
import socket
import subprocess
import time

import pytest
from conftest import STORESCU, free_port, require_tool, wait_until

from pacsworker.config import Settings
from pacsworker.scp.server import Receiver
from pacsworker.scp.spool import series_files

CT06 = "ct06_ge_lightspeed_liver_3slice"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, the receiver's certificate for 127.0.0.1, a client certificate, and a stranger's."""
    trustme = pytest.importorskip("trustme", reason="trustme (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = trustme.CA(), trustme.CA()
    files = {}
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")),
                       ("client", ca.issue_cert("modality.example", common_name="CT-SCANNER-1")),
                       ("stranger", stranger_ca.issue_cert("stranger.example", common_name="STRANGER"))):
        key, chain = folder / f"{name}.key", folder / f"{name}.pem"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(chain))
        files[name] = (key, chain)
    files["ca"] = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(files["ca"]))
    return files


@pytest.fixture
def tls_receiver(tmp_path, pki):
    key, chain = pki["server"]
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 0.5, "plain": False,
             "tls": {"port": free_port(), "certificate": str(chain), "private_key": str(key),
                     "ca_certificates": str(pki["ca"]), "require_client_certificate": True,
                     "handshake_timeout": 2}},
        storage={"data_dir": str(tmp_path / "data")},
    )
    completed = []
    receiver = Receiver(settings, completed.append)
    receiver.completed = completed
    receiver.start()
    yield receiver
    receiver.stop()


def _storescu_tls(port: int, folder, pki, identity: str | None) -> subprocess.CompletedProcess:
    require_tool(STORESCU)
    tls = ["+tls", *map(str, pki[identity])] if identity else ["+tla"]
    command = [STORESCU, *tls, "+cf", str(pki["ca"]), "-aet", "MODALITY", "-aec", "PACSWORKER", "-to", "10",
               "127.0.0.1", str(port), *map(str, sorted(folder.glob("*.dcm")))]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_storescu_over_tls_with_a_client_certificate(tls_receiver, dicom_dir, pki, caplog):
    caplog.set_level(logging.INFO, logger="pacsworker")
    port = tls_receiver.settings.scp.tls.port
    # a peer that connects and never starts its handshake holds no one else up
    silent = socket.create_connection(("127.0.0.1", port))
    try:
        sent = _storescu_tls(port, dicom_dir / CT06, pki, "client")
        assert sent.returncode == 0, sent.stderr[-2000:]
        wait_until(lambda: tls_receiver.completed, 30, what="the series over TLS")
        [record] = tls_receiver.completed
        assert len(series_files(tls_receiver.layout.series_dir(record.series_uid))) == 3
        assert "client certificate CT-SCANNER-1" in caplog.text
        wait_until(lambda: "not finished within 2 s; closed" in caplog.text, 10, what="the silent peer to be dropped")
    finally:
        silent.close()
    # the plain port is off (plain: false): nothing listens there
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tls_receiver.settings.scp.port), timeout=2)


@pytest.mark.parametrize("peer, reason", [
    (None, "TLS handshake with 127.0.0.1:"),  # anonymous TLS: no certificate, one is required
    ("stranger", "TLS handshake with 127.0.0.1:"),  # a certificate of another CA
    ("plain", "TLS handshake with 127.0.0.1:"),  # plain DICOM to the TLS port
])
def test_peers_that_fail_tls_are_refused_and_the_receiver_serves_on(tls_receiver, dicom_dir, pki, caplog, peer, reason):
    port = tls_receiver.settings.scp.tls.port
    if peer == "plain":
        command = [STORESCU, "-aet", "MODALITY", "-aec", "PACSWORKER", "-to", "5", "127.0.0.1", str(port),
                   *map(str, sorted((dicom_dir / CT06).glob("*.dcm")))]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    else:
        refused = _storescu_tls(port, dicom_dir / CT06, pki, peer)
    assert refused.returncode != 0
    wait_until(lambda: reason in caplog.text and "failed" in caplog.text, 10, what="the refusal in the log")
    time.sleep(1)
    assert tls_receiver.completed == [] and not list(tls_receiver.layout.spool.glob("*/*.dcm"))
    sent = _storescu_tls(port, dicom_dir / CT06, pki, "client")
    assert sent.returncode == 0, sent.stderr[-2000:]
    wait_until(lambda: tls_receiver.completed, 30, what="the next peer's series")
