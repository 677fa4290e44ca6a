"""The HTTP doors against hostile and broken peers, over real sockets: STOW-RS in (and the server
layer under it), the operator port, TLS. Memory is read from /proc of a ``pacsworker scp``
process, as in the DIMSE hostile-peer tests."""

from __future__ import annotations

import logging
import socket
import struct
import time
from io import BytesIO

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import Pacsworker, free_port, port_open, wait_until, write_config
from pacsworker.config import Settings
from pacsworker.multipart import encode_multipart
from pacsworker.ops_http import OpsServer
from pacsworker.scp.server import Receiver
from pacsworker.start_up import status_line
from test_hostile_peers import MB, PeakWatch
from test_tls import pki  # noqa: F401 - the test CA and certificates, a fixture

CT06 = "ct06_ge_lightspeed_liver_3slice"
MAX_BYTES = 8 << 20
LIMITS = {"header_timeout": 1.0, "body_timeout": 1.0, "keep_alive_timeout": 1.0, "max_connections": 400}


def _receiver(tmp_path, **scp) -> Receiver:
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "stow_port": free_port(), "series_quiet_seconds": 3600,
             "stow_max_bytes": MAX_BYTES, "stow_limits": LIMITS, **scp},
        storage={"data_dir": str(tmp_path / "data"), "min_free_bytes": 0},
    )
    receiver = Receiver(settings, lambda record: None)
    receiver.start()
    return receiver


@pytest.fixture
def receiver(tmp_path):
    rx = _receiver(tmp_path)
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def ct(dicom_dir) -> list[bytes]:
    return [path.read_bytes() for path in sorted((dicom_dir / CT06).glob("*.dcm"))]


def _uid(part10: bytes) -> str:
    return str(pydicom.dcmread(BytesIO(part10), stop_before_pixels=True).SOPInstanceUID)


def _stored(receiver) -> set[str]:
    return {path.stem for path in receiver.layout.spool.rglob("*.dcm")}


def _incoming(receiver) -> list:
    return list(receiver.layout.incoming.iterdir())


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def _request(path: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: pacsworker\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class Answers:
    """HTTP/1.1 responses read one by one from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def next(self) -> tuple[int, dict[str, str], bytes] | None:
        """The next response; None when the server closed the connection instead."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._fill():
                break
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        """Whether the server closes the connection (after what it sent)."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:  # closed with bytes it had not read: also closed
            return True
        except TimeoutError:
            return False
        return True


def _cut(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (it reads end of stream or a reset)."""
    sock.settimeout(0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_are_cut_after_the_head_timeout_while_others_are_served(receiver, ct):
    port = receiver.settings.scp.stow_port
    idle = [_connect(port) for _ in range(300)]  # connect and never send a request line
    try:
        body, content_type = encode_multipart([("application/dicom", ct[0])])
        answer = requests.post(f"http://127.0.0.1:{port}/studies", data=body, timeout=30,
                               headers={"Content-Type": content_type})
        assert answer.status_code == 200 and _uid(ct[0]) in _stored(receiver)
        wait_until(lambda: all(_cut(sock) for sock in idle), 60, what="the idle connections to be cut")
        again = requests.post(f"http://127.0.0.1:{port}/studies", data=body, timeout=30,
                              headers={"Content-Type": content_type})
        assert again.status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_a_dribbled_request_head_is_cut(receiver, caplog):
    caplog.set_level(logging.INFO, "pacsworker.http")
    sock = _connect(receiver.settings.scp.stow_port)
    sock.sendall(b"POST /studies HTTP/1.1\r\nHost: pacsworker\r\n")
    sent = 0
    try:
        for _ in range(600):  # one header byte every 50 ms: a head that would never end
            sock.sendall(b"X-Slow: " if sent == 0 else b"a")
            sent += 1
            time.sleep(0.05)
            if _cut(sock):
                break
        else:
            pytest.fail(f"a head dribbled for {sent} sends was never cut")
    except (BrokenPipeError, ConnectionResetError):
        pass  # cut while sending
    finally:
        sock.close()
    assert any("no whole request head" in r.getMessage() and "127.0.0.1:" in r.getMessage() for r in caplog.records)


def test_a_stalled_body_is_cut_and_leaves_nothing_behind(receiver, ct):
    body, content_type = encode_multipart([("application/dicom", ct[0])])
    sock = _connect(receiver.settings.scp.stow_port)
    with sock:
        sock.sendall(_request("/studies", body, content_type)[:-len(body) // 2])  # half the body, then silence
        wait_until(lambda: _incoming(receiver), 10, what="the part to be written as it arrives")
        answers = Answers(sock)
        status, headers, _ = answers.next() or (0, {}, b"")
        assert status == 408 and headers.get("connection") == "close" and answers.closed()
    assert not _incoming(receiver) and not _stored(receiver)


@pytest.mark.parametrize("first, expected", [
    (("/elsewhere", "multipart/related; boundary=x"), 404),
    (("/studies", "application/json"), 415),
])
def test_a_refused_request_body_is_never_read_as_the_next_request(receiver, ct, first, expected):
    """404 and 415 answered without reading the body: the next request on the connection is answered
    as itself, and the body (a request of its own) is never answered."""
    smuggled = _request("/studies", b"{}", "application/json")  # would be answered 415
    good, content_type = encode_multipart([("application/dicom", ct[0])])
    with _connect(receiver.settings.scp.stow_port) as sock:
        sock.sendall(_request(first[0], smuggled, first[1]) + _request("/studies", good, content_type))
        answers = Answers(sock)
        refused, following = answers.next(), answers.next()
    assert refused is not None and refused[0] == expected
    assert following is not None and following[0] == 200 and _uid(ct[0]) in following[2].decode()


def test_a_request_with_two_body_lengths_is_refused_and_the_connection_closed(receiver, caplog):
    """Content-Length and chunked at once (the classic smuggling request): 400, and nothing after it is read."""
    smuggled = _request("/studies", b"{}", "application/json")
    request = (b"POST /studies HTTP/1.1\r\nHost: p\r\nContent-Type: multipart/related; boundary=x\r\n"
               b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
    with _connect(receiver.settings.scp.stow_port) as sock:
        sock.sendall(request)
        answers = Answers(sock)
        status, headers, _ = answers.next() or (0, {}, b"")
        assert status == 400 and headers.get("connection") == "close" and answers.closed()
    with _connect(receiver.settings.scp.stow_port) as sock:  # and a head that is not HTTP at all
        sock.sendall(b"\x16\x03\x01 not HTTP\r\n\r\n" + smuggled)
        answers = Answers(sock)
        status, _, _ = answers.next() or (0, {}, b"")
        assert status == 400 and answers.closed()
    refusals = [r.getMessage() for r in caplog.records if "not a valid HTTP/1.1 request head" in r.getMessage()]
    assert len(refusals) == 2 and all("from 127.0.0.1:" in message for message in refusals)


def test_a_large_unread_body_closes_the_connection(receiver, ct):
    """413 for a declared length over stow_max_bytes, and a 404 with much body unread: answered, then
    the connection is closed rather than the body read as requests."""
    smuggled = _request("/studies", b"{}", "application/json")
    content_type = "multipart/related; boundary=x"
    over = f"POST /studies HTTP/1.1\r\nHost: p\r\nContent-Type: {content_type}\r\nContent-Length: {MAX_BYTES + 1}\r\n\r\n"
    large_404 = _request("/elsewhere", smuggled + bytes(100_000), content_type)
    for request, expected in ((over.encode() + smuggled, 413), (large_404, 404)):
        with _connect(receiver.settings.scp.stow_port) as sock:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while the body was on its way
            answers = Answers(sock)
            status, headers, _ = answers.next() or (0, {}, b"")
            assert status == expected and headers.get("connection") == "close"
            assert answers.closed()  # and the body's request was never answered


def test_chunked_bodies_are_stored(receiver, ct):
    body, content_type = encode_multipart([("application/dicom", part) for part in ct])

    def chunks():  # requests sends a generator with Transfer-Encoding: chunked
        for start in range(0, len(body), 7001):
            yield body[start:start + 7001]

    answer = requests.post(f"http://127.0.0.1:{receiver.settings.scp.stow_port}/studies", data=chunks(), timeout=30,
                           headers={"Content-Type": content_type})
    assert answer.status_code == 200
    assert _stored(receiver) == {_uid(part) for part in ct} and not _incoming(receiver)
    # a chunked body has no length to refuse up front: it is cut where it passes stow_max_bytes
    over = requests.post(f"http://127.0.0.1:{receiver.settings.scp.stow_port}/studies", timeout=30,
                         data=(body[:1000] if n == 0 else bytes(MB) for n in range(MAX_BYTES // MB + 2)),
                         headers={"Content-Type": content_type})
    assert over.status_code == 413 and over.headers["connection"] == "close" and not _incoming(receiver)


def test_a_body_cut_off_keeps_the_whole_parts_before_and_nothing_of_the_cut_one(receiver, ct):
    body, content_type = encode_multipart([("application/dicom", ct[0]), ("application/dicom", ct[1])])
    with _connect(receiver.settings.scp.stow_port) as sock:
        request = _request("/studies", body, content_type)
        sock.sendall(request[:len(request) - len(ct[1]) // 2])  # the second part half sent
        wait_until(lambda: _uid(ct[0]) in _stored(receiver), 10, what="the first part stored")
    wait_until(lambda: not _incoming(receiver), 10, what="the cut part to be discarded")
    assert _stored(receiver) == {_uid(ct[0])}


@pytest.mark.parametrize("damage", ["no closing delimiter", "junk after a delimiter"])
def test_a_malformed_multipart_body_is_refused_after_the_parts_before_it(receiver, ct, damage):
    body, content_type = encode_multipart([("application/dicom", ct[0]), ("application/dicom", ct[1])])
    boundary = content_type.split('"')[1].encode()
    if damage == "no closing delimiter":
        body = body[:body.rindex(b"--" + boundary)]
    else:
        second = body.index(b"--" + boundary, 10)
        body = body[:second + len(boundary) + 2] + b"garbage" + body[second + len(boundary) + 2:]
    answer = requests.post(f"http://127.0.0.1:{receiver.settings.scp.stow_port}/studies", data=body, timeout=30,
                           headers={"Content-Type": content_type})
    assert answer.status_code == 400 and "malformed multipart" in answer.text and "1 instance(s)" in answer.text
    assert _stored(receiver) == {_uid(ct[0])} and not _incoming(receiver)


def test_a_part_that_is_not_dicom_is_refused_among_stored_ones(receiver, ct):
    body, content_type = encode_multipart([("application/dicom", ct[0]), ("application/dicom", b"%PDF-1.4 not DICOM"),
                                           ("application/dicom", ct[2])])
    answer = requests.post(f"http://127.0.0.1:{receiver.settings.scp.stow_port}/studies", data=body, timeout=30,
                           headers={"Content-Type": content_type})
    assert answer.status_code == 202
    document = answer.json()
    assert {item["00081155"]["Value"][0] for item in document["00081199"]["Value"]} == {_uid(ct[0]), _uid(ct[2])}
    [failed] = document["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert _stored(receiver) == {_uid(ct[0]), _uid(ct[2])} and not _incoming(receiver)


def test_connections_and_requests_beyond_the_limits_are_answered_503(tmp_path, ct):
    rx = _receiver(tmp_path, stow_limits={**LIMITS, "max_connections": 2, "max_requests": 1, "body_timeout": 30})
    port = rx.settings.scp.stow_port
    body, content_type = encode_multipart([("application/dicom", ct[0])])
    request = _request("/studies", body, content_type)
    try:
        with _connect(port) as busy, _connect(port) as second:
            busy.sendall(request[:-100])  # a request being served: the rest of its body is coming
            wait_until(lambda: _incoming(rx), 10, what="the first request to be served")
            second.sendall(_request("/studies", b"--x--\r\n", "multipart/related; boundary=x"))
            status, headers, text = Answers(second).next() or (0, {}, b"")
            assert status == 503 and b"too many requests" in text and "connection" not in headers  # kept open
            with _connect(port) as over:  # busy and second are open: one more than allowed
                answers = Answers(over)
                status, headers, text = answers.next() or (0, {}, b"")
                assert status == 503 and b"too many connections" in text and headers["connection"] == "close"
                assert answers.closed()
            busy.sendall(request[-100:])
            status, _, _ = Answers(busy).next() or (0, {}, b"")
            assert status == 200
    finally:
        rx.stop()
    assert not port_open(port)  # stopped: the door is closed


def test_stow_rs_over_tls_with_and_without_client_certificates(tmp_path, ct, pki):  # noqa: F811
    key, chain = pki["server"]
    body, content_type = encode_multipart([("application/dicom", ct[0])])
    headers = {"Content-Type": content_type}
    tls = {"certificate": str(chain), "private_key": str(key), "ca_certificates": str(pki["ca"]),
           "require_client_certificate": True, "handshake_timeout": 2}
    rx = _receiver(tmp_path / "required", stow_tls=tls)
    url = f"https://127.0.0.1:{rx.settings.scp.stow_port}/studies"
    try:
        client = tuple(map(str, reversed(pki["client"])))  # (certificate, key)
        assert requests.post(url, data=body, headers=headers, verify=str(pki["ca"]), cert=client, timeout=30).ok
        for identity in (None, tuple(map(str, reversed(pki["stranger"])))):  # none, or one the CAs did not sign
            with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
                requests.post(url, data=body, headers=headers, verify=str(pki["ca"]), cert=identity, timeout=30)
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP on the TLS port
            requests.post(url.replace("https", "http"), data=body, headers=headers, timeout=30)
        with _connect(rx.settings.scp.stow_port) as silent:  # connects, never starts the handshake
            wait_until(lambda: _cut(silent), 30, what="a peer that never starts TLS to be cut")
    finally:
        rx.stop()
    rx = _receiver(tmp_path / "optional", stow_tls={**tls, "require_client_certificate": False,
                                                    "ca_certificates": None})
    try:
        answer = requests.post(f"https://127.0.0.1:{rx.settings.scp.stow_port}/studies", data=body, headers=headers,
                               verify=str(pki["ca"]), timeout=30)
        assert answer.status_code == 200 and _stored(rx) == {_uid(ct[0])}
    finally:
        rx.stop()


def test_https_without_a_stow_port_is_refused_naming_it(pki):  # noqa: F811
    from pydantic import ValidationError

    key, chain = pki["server"]
    with pytest.raises(ValidationError, match="stow_tls needs stow_port"):
        Settings(scp={"stow_tls": {"certificate": str(chain), "private_key": str(key)}})
    with pytest.raises(ValidationError, match="max_requests"):
        Settings(scp={"stow_port": 8080, "stow_limits": {"max_requests": 0}})


def test_pull_reaches_a_receiver_that_serves_https(tmp_path, pki):  # noqa: F811
    """``pacsworker pull`` calls the receiver's HTTPS port when scp.stow_tls is set (here the PACS it
    would pull from is down: the receiver's 502 comes back, so the call itself went through)."""
    import subprocess
    import sys

    key, chain = pki["server"]
    rx = _receiver(tmp_path, pull_url=f"http://127.0.0.1:{free_port()}/dicom-web",
                   stow_tls={"certificate": str(chain), "private_key": str(key), "ca_certificates": str(pki["ca"])})
    try:
        config = write_config(tmp_path / "c.yaml", scp=rx.settings.scp.model_dump(mode="json", exclude_none=True),
                              storage={"data_dir": str(tmp_path / "data")})
        pulled = subprocess.run([sys.executable, "-m", "pacsworker", "pull", "--study", "1.2.3", "--config",
                                 str(config)], capture_output=True, text=True, timeout=120)
        said = " ".join((pulled.stdout + pulled.stderr).split())
        assert pulled.returncode == 1 and "pull refused (502)" in said, said
    finally:
        rx.stop()


def test_the_operator_port_listens_on_loopback_unless_told(tmp_path, pki, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, "pacsworker.ops")
    settings = Settings(storage={"data_dir": str(tmp_path / "data")})
    assert settings.metrics.host == "127.0.0.1" and "this host only" in status_line(settings)
    ops = OpsServer(settings, "scp", free_port()).start()
    try:
        assert ops.http.sock.getsockname()[0] == "127.0.0.1"
        assert f"on http://127.0.0.1:{ops.port}/" in caplog.text
        assert requests.get(f"http://127.0.0.1:{ops.port}/healthz", timeout=10).text == "ok\n"
    finally:
        ops.shutdown()
    key, chain = pki["server"]
    settings = Settings(storage={"data_dir": str(tmp_path / "data")},
                        metrics={"tls": {"certificate": str(chain), "private_key": str(key)}})
    ops = OpsServer(settings, "scp", free_port()).start()
    try:
        answer = requests.get(f"https://127.0.0.1:{ops.port}/healthz", verify=str(pki["ca"]), timeout=10)
        assert answer.status_code == 200 and answer.text == "ok\n"
    finally:
        ops.shutdown()


def big_part(pixel_bytes: int) -> tuple[bytes, str]:
    """The Part 10 head of a CT image whose pixel data (``pixel_bytes`` of zeros) follows it."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 16384, pixel_bytes // (16384 * 2)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes), ds.SOPInstanceUID


def test_a_1_gb_body_streams_through_in_bounded_memory(tmp_path):
    port, stow_port = free_port(), free_port()
    config = write_config(tmp_path / "c.yaml", scp={"host": "127.0.0.1", "port": port, "stow_port": stow_port,
                                                    "series_quiet_seconds": 3600},
                          storage={"data_dir": str(tmp_path / "data"), "min_free_bytes": 0})
    proc = Pacsworker(["scp"], config, tmp_path / "scp.log")
    try:
        wait_until(lambda: port_open(stow_port), 60, what="pacsworker scp's STOW-RS port")
        head, sop_uid = big_part(1 << 30)
        boundary = "b" * 32
        opening = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
        closing = f"\r\n--{boundary}--\r\n".encode()

        def body():
            yield opening
            zeros = bytes(MB)
            for _ in range(1024):
                yield zeros
            yield closing

        with PeakWatch(proc.proc.pid, "1 GiB STOW-RS body") as watch:
            answer = requests.post(f"http://127.0.0.1:{stow_port}/studies", data=body(), timeout=600,
                                   headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                                            f'boundary={boundary}'})
        assert answer.status_code == 200, answer.text
        assert watch.growth < 200 * MB, f"peak RSS grew by {watch.growth / MB:.0f} MB for a 1 GiB body"
        print(f"[http] 1 GiB STOW-RS body: peak RSS grew by {watch.growth / MB:.0f} MB")
        [stored] = list((tmp_path / "data" / "spool").glob(f"*/{sop_uid}.dcm"))
        assert stored.stat().st_size == len(head) + (1 << 30)
        stored.unlink()
        assert not list((tmp_path / "data" / "incoming").iterdir())
    finally:
        proc.stop()
