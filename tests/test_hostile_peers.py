"""What an attacker (or a broken device) on the hospital network can send, as real bytes.

The memory checks run against a ``pacsworker scp`` process, whose peak RSS (VmHWM) is read from
/proc before and after each input. The rest use an in-process receiver and its log.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from io import BytesIO

import pydicom
import pytest
from conftest import Pacsworker, echo_ok, free_port, port_open, wait_until, write_config
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification
from wire_bytes import (
    CT_IMAGE,
    ECHO_CONTEXT,
    EXPLICIT_LE,
    associate,
    associate_rq,
    associated,
    command_set,
    connect,
    deflate_bomb,
    explicit_le,
    pdv_pdu,
    pdvs,
    raw_store,
    read_pdu,
    store_command,
    stream_store,
    ui,
    us,
    wait_closed,
)

from pacsworker.config import Settings
from pacsworker.scp.server import Receiver
from pacsworker.scp.wire import printable

MB = 1 << 20
MEMORY_BOUND = 100 * MB  # a hostile input may not raise the receiver's peak RSS by more than this
NETWORK_TIMEOUT = 3.0
REPORT: dict[str, str] = {}


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


MODES = {"fast_path": True, "pynetdicom_path": False}  # scp.fast_path


@pytest.fixture(scope="module", params=sorted(MODES))
def scp_process(request, tmp_path_factory):
    """A real ``pacsworker scp`` with a short network timeout and 4 association slots, one per mode."""
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    config = write_config(
        tmp / "config.yaml",
        scp={"host": "127.0.0.1", "port": port, "series_quiet_seconds": 3600, "max_associations": 4,
             "network_timeout": NETWORK_TIMEOUT, "max_inflated_bytes": 2 << 30, "fast_path": MODES[request.param]},
        storage={"data_dir": str(tmp / "data")},
    )
    proc = Pacsworker(["scp"], config, tmp / "scp.log")
    proc.port, proc.data_dir = port, tmp / "data"
    wait_until(lambda: port_open(port), 60, what="pacsworker scp to listen")
    yield proc
    proc.stop()
    for name, line in REPORT.items():
        print(f"[hostile {request.param}] {name}: {line}")
    REPORT.clear()


class PeakWatch:
    """Peak RSS of the receiver across a block, against its resident size before."""

    def __init__(self, pid: int, name: str):
        self.pid, self.name = pid, name

    def __enter__(self):
        self.before = memory(self.pid)
        return self

    def __exit__(self, *exc):
        after = memory(self.pid)
        self.peak = after["VmHWM"]
        self.growth = self.peak - max(self.before["VmHWM"], self.before["VmRSS"])
        REPORT[self.name] = f"RSS before {self.before['VmRSS'] / MB:.0f} MB, peak after {self.peak / MB:.0f} MB"


def test_deflate_bomb_is_walked_in_bounded_memory_and_stored_as_received(scp_process):
    bomb, sop_uid = deflate_bomb(1 << 30)  # 1 MiB on the wire, 1 GiB inflated
    with PeakWatch(scp_process.proc.pid, "deflate bomb (1 MiB -> 1 GiB)") as watch:
        status = raw_store(scp_process.port, bomb, sop_uid, DeflatedExplicitVRLittleEndian)
    assert status == 0x0000  # a well-formed dataset, however large it inflates
    assert watch.growth < MEMORY_BOUND, REPORT[watch.name]
    [stored] = list((scp_process.data_dir / "spool").glob(f"*/{sop_uid}.dcm"))
    assert stored.stat().st_size < len(bomb) + 4096  # the deflated bytes, not the inflated ones
    ds = pydicom.dcmread(stored, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian and ds.SOPInstanceUID == sop_uid


def test_a_large_dataset_in_valid_pdus_is_written_as_it_arrives(scp_process):
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8192, 16384, 16, 16, 15, 0
    pixels = 8192 * 16384 * 2  # 256 MiB
    head = explicit_le(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels)
    with PeakWatch(scp_process.proc.pid, "256 MiB dataset in valid P-DATA-TF PDUs") as watch:
        status = stream_store(scp_process.port, head, pixels, ds.SOPInstanceUID)
    assert status == 0x0000
    assert watch.growth < MEMORY_BOUND, REPORT[watch.name]
    [stored] = list((scp_process.data_dir / "spool").glob(f"*/{ds.SOPInstanceUID}.dcm"))
    assert stored.stat().st_size > pixels
    stored.unlink()
    assert not list((scp_process.data_dir / "incoming").iterdir())


def test_an_association_aborted_mid_dataset_leaves_nothing_behind(scp_process):
    sock = associated(scp_process.port, abstract=CT_IMAGE.encode(), syntax=EXPLICIT_LE)
    sock.sendall(pdv_pdu(0x03, store_command(generate_uid())))
    sock.sendall(pdv_pdu(0x00, bytes(100_000)))
    incoming = scp_process.data_dir / "incoming"
    wait_until(lambda: list(incoming.iterdir()), 10, what="the partial dataset on disk")
    sock.close()  # the sender dies mid-dataset
    wait_until(lambda: not list(incoming.iterdir()), 10, what="the partial dataset to be discarded")


def _stream_until_closed(sock: socket.socket, limit: int) -> int:
    """Send zeros until the receiver closes the connection (or ``limit`` bytes); returns bytes sent."""
    chunk, sent = bytes(MB), 0
    sock.settimeout(10)
    try:
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    return sent


@pytest.mark.parametrize("phase", ["A-ASSOCIATE-RQ", "P-DATA-TF"])
def test_pdu_announcing_4_gib_is_aborted_before_its_body_is_read(scp_process, phase):
    port = scp_process.port
    header = struct.pack(">BBL", 0x01 if phase == "A-ASSOCIATE-RQ" else 0x04, 0, 0xFFFFFFFF)
    # the announcement alone gets an A-ABORT at once
    sock = connect(port) if phase == "A-ASSOCIATE-RQ" else associated(port)
    sock.sendall(header)
    assert read_pdu(sock, timeout=NETWORK_TIMEOUT / 2)[0] == 0x07
    sock.close()
    # and streaming a body behind it does not get buffered
    with PeakWatch(scp_process.proc.pid, f"{phase} announcing 4 GiB, body streamed") as watch:
        sock = connect(port) if phase == "A-ASSOCIATE-RQ" else associated(port)
        sock.sendall(header)
        sent = _stream_until_closed(sock, 1 << 30)
        sock.close()
    REPORT[watch.name] += f", {sent / MB:.0f} MiB accepted before the connection closed"
    assert sent < 256 * MB
    assert watch.growth < MEMORY_BOUND, REPORT[watch.name]
    assert wait_until(lambda: echo_ok(port), 10, what="the receiver to answer C-ECHO")


def test_half_sent_pdus_time_out_and_free_their_slots(scp_process):
    port = scp_process.port
    stalled = []
    for n in range(4):  # every slot: association requests and, once associated, P-DATA
        sock = connect(port) if n % 2 else associated(port)
        body_len = 200
        sock.sendall(struct.pack(">BBL", 0x01 if n % 2 else 0x04, 0, body_len) + b"\x00" * 10)
        stalled.append(sock)
    time.sleep(0.3)
    assert not echo_ok(port), "the stalled connections should hold every association slot"
    started = time.monotonic()
    times = [wait_closed(sock, 60) for sock in stalled]
    dropped_after = time.monotonic() - started
    REPORT["half-sent PDU"] = f"dropped {max(times):.1f} s after the last byte (network_timeout {NETWORK_TIMEOUT:g} s)"
    assert dropped_after < 30, "a stalled PDU must be dropped after the network timeout"
    assert wait_until(lambda: echo_ok(port), 5, what="a free slot after the stalled PDUs were dropped")


def test_connect_and_close_frees_the_slot_at_once(scp_process):
    port = scp_process.port
    for _ in range(4):  # what a load balancer's health check does, once per slot
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    started = time.monotonic()
    # without the fix each slot stays taken for acse_timeout (30 s)
    assert wait_until(lambda: echo_ok(port), 5, interval=0.1, what="C-ECHO after bare connects")
    REPORT["bare connect-and-close"] = f"C-ECHO accepted {time.monotonic() - started:.2f} s after 4 bare connects"


@pytest.mark.parametrize("calling", [b"EVIL\x00\x1b[2J", b"\xc3\xa9CHO", b"A\\B"])
def test_unprintable_calling_ae_gets_a_reject_and_an_escaped_log_line(scp_process, calling):
    sock = connect(scp_process.port)
    sock.sendall(associate_rq(calling=calling))
    pdu_type, body = read_pdu(sock)
    sock.close()
    assert pdu_type == 0x03, "expected A-ASSOCIATE-RJ"
    assert tuple(body[1:4]) == (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
    line = f"rejected: calling AE title '{printable(calling)}' is not printable ASCII".encode()
    wait_until(lambda: line in scp_process.log.read_bytes(), 10, what="the log line")
    log = scp_process.log.read_bytes()
    assert b"\x1b" not in log and b"\x00" not in log and b"Traceback" not in log
    assert echo_ok(scp_process.port)


def test_the_receiver_log_names_no_raw_bytes_or_tracebacks(scp_process):
    text = scp_process.log.read_bytes()
    assert b"Traceback" not in text and b"\x1b" not in text and b"\x00" not in text
    assert b"calling AE title 'EVIL\\x00\\x1b[2J' is not printable ASCII" in text


def test_a_uid_with_a_newline_forges_no_line_through_the_libraries_logging(scp_process):
    """pynetdicom quotes a C-ECHO's SOP class UID as it came when it warns about it: the line is escaped."""
    sock = associate(scp_process.port)
    forged = "FORGED ERROR pacsworker.scp: association from ADMIN accepted"
    echo = command_set((0x0002, ui("1.2.840.10008.1.1\n" + forged)), (0x0100, us(0x0030)), (0x0110, us(1)),
                       (0x0800, us(0x0101)))
    sock.sendall(pdvs((ECHO_CONTEXT, 0x03, echo)))
    read_pdu(sock)
    sock.close()
    wait_until(lambda: b"x0aFORGED" in scp_process.log.read_bytes(), 10, what="the escaped warning in the log")
    lines = scp_process.log.read_bytes().splitlines()
    assert not [line for line in lines if line.startswith(b"FORGED")]


# -- in-process receiver: what is refused and what is logged ---------------------------------------
@pytest.fixture(params=sorted(MODES))
def receiver(request, tmp_path):
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 3600,
             "allowed_calling_aets": ["SCU"], "max_associations": 1, "fast_path": MODES[request.param]},
        storage={"data_dir": str(tmp_path / "data")},
    )
    rx = Receiver(settings, lambda record: None)
    rx.start()
    yield rx
    rx.stop()


def _dataset_bytes(path) -> tuple[bytes, pydicom.Dataset]:
    ds = pydicom.dcmread(path)
    raw = path.read_bytes()
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = BytesIO(raw)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return raw[fp.tell():], ds


def _nothing_stored(rx: Receiver) -> bool:
    return not any(p for p in rx.layout.spool.rglob("*") if p.is_file())


def test_dataset_cut_in_its_pixel_data_is_refused(receiver, dicom_dir, caplog):
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    body, ds = _dataset_bytes(sorted((dicom_dir / "ct02_philips_ingenuity_headphantom_5mm").glob("*.dcm"))[0])
    status = raw_store(receiver.settings.scp.port, body[: len(body) - 50_000], ds.SOPInstanceUID, ExplicitVRLittleEndian)
    assert status == 0xC000
    assert f"refused C-STORE {ds.SOPInstanceUID} from SCU: the dataset ends inside an element" in caplog.text
    assert _nothing_stored(receiver)


def test_pixel_data_shorter_than_its_header_implies_is_refused(receiver, dicom_dir, caplog):
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    ds = pydicom.dcmread(sorted((dicom_dir / "ct02_philips_ingenuity_headphantom_5mm").glob("*.dcm"))[0])
    ds.Rows = ds.Rows * 2  # header promises twice the pixels the element holds
    status = raw_store(receiver.settings.scp.port, explicit_le(ds), ds.SOPInstanceUID, ExplicitVRLittleEndian)
    assert status == 0xC000
    assert "fewer than the" in caplog.text and "Rows x Columns x Samples x Bits Allocated x Frames" in caplog.text
    assert _nothing_stored(receiver)


def test_malformed_fragment_sequence_is_refused(receiver, dicom_dir, caplog):
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    path = sorted((dicom_dir / "mr12_siemens_trio_4sl_j2k_lossless").glob("*.dcm"))[0]
    body, ds = _dataset_bytes(path)
    syntax = ds.file_meta.TransferSyntaxUID
    assert body.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # the sequence delimiter
    status = raw_store(receiver.settings.scp.port, body[:-8], ds.SOPInstanceUID, syntax, MRImageStorage)
    assert status == 0xC000
    assert f"refused C-STORE {ds.SOPInstanceUID}" in caplog.text
    assert _nothing_stored(receiver)
    # the whole file is accepted
    assert raw_store(receiver.settings.scp.port, body, ds.SOPInstanceUID, syntax, MRImageStorage) == 0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_deflated_dataset_beyond_the_inflate_limit_is_refused(tmp_path, caplog, mode):
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "max_inflated_bytes": 16 * MB, "fast_path": MODES[mode]},
        storage={"data_dir": str(tmp_path / "data")},
    )
    rx = Receiver(settings, lambda record: None)
    rx.start()
    try:
        bomb, sop_uid = deflate_bomb(64 * MB)
        assert raw_store(settings.scp.port, bomb, sop_uid, DeflatedExplicitVRLittleEndian) == 0xC000
        assert "inflates to more than 16777216 bytes" in caplog.text
        assert _nothing_stored(rx)
    finally:
        rx.stop()


def test_c_store_without_a_dataset_is_answered_with_a_failure(receiver, caplog):
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    started = time.monotonic()
    # the command announces a dataset; no fragment of it ever follows
    assert raw_store(receiver.settings.scp.port, b"", generate_uid(), ExplicitVRLittleEndian) == 0xC000
    waited = time.monotonic() - started
    assert waited < receiver.settings.scp.network_timeout  # answered, not aborted by the idle timeout
    assert "announced a dataset but none arrived" in caplog.text and "the dataset is empty (0 bytes)" in caplog.text
    assert echo_ok(receiver.settings.scp.port)


def test_rejections_are_logged_with_their_real_reason_and_values(receiver, caplog):
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    port = receiver.settings.scp.port
    assert not echo_ok(port, aec="SOMEONE_ELSE")
    assert "association from SCU (127.0.0.1) to SOMEONE_ELSE rejected: called AE title is not this receiver's" in caplog.text
    assert not echo_ok(port, aet="INTRUDER")
    assert "association from INTRUDER (127.0.0.1) to PACSWORKER rejected: calling AE title not in allowed_calling_aets" in caplog.text
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", port, ae_title="PACSWORKER")  # takes the only slot
    assert held.is_established
    try:
        assert not echo_ok(port)
        assert "to PACSWORKER rejected: too many associations (max_associations 1)" in caplog.text
    finally:
        held.release()
    assert "AE title not allowed" not in caplog.text


def test_wire_values_in_refusals_are_escaped(receiver, caplog):
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT_IMAGE, "1.2.3\x1b[31m", "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    assert raw_store(receiver.settings.scp.port, explicit_le(ds), "1.2.3.4", ExplicitVRLittleEndian) == 0xC000
    assert "SOPInstanceUID '1.2.3\\x1b[31m' is missing or not a valid UID" in caplog.text
    assert "\x1b" not in caplog.text
    assert _nothing_stored(receiver)


def test_stored_instances_pass_the_check_for_every_fixture(receiver, dicom_dir):
    """Every catalogued series (CT, MR, enhanced, compressed, SEG, SR) goes through the check."""
    from pacsworker.replay import replay

    folders = sorted(p for p in dicom_dir.iterdir() if p.is_dir())
    instances = set()
    for folder in folders:
        report = replay([folder], "127.0.0.1", receiver.settings.scp.port, "PACSWORKER", "SCU")
        assert not report.failed, f"{folder.name}: {report.failed[:2]}"
        for path in folder.glob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
            instances.add((str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    stored = {(p.parent.name, p.stem) for p in receiver.layout.spool.glob("*/*.dcm")}
    assert stored == instances
