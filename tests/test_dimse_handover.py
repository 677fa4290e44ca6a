"""What a hostile or broken peer sends at the hand-over between the fast path and pynetdicom, as real
bytes on raw associations, against one receiver per mode (``scp.fast_path`` true and false).

Each case checks what the sender gets back (the answer and its status, or the refusal of the
association), what is left on disk (nothing in incoming/) and what the receiver holds afterwards
(its threads and open descriptors back to where they were).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time

import pydicom
import pytest
from conftest import free_port, wait_until
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid
from pynetdicom.sop_class import MRImageStorage
from wire_bytes import (
    CT_CONTEXT,
    CT_IMAGE,
    ECHO_CONTEXT,
    associate,
    command,
    command_set,
    ct_dataset,
    echo_command,
    pdvs,
    raw_store,
    read_pdu,
    release,
    response,
    ui,
    us,
)

from pacsworker.config import Settings
from pacsworker.scp.server import Receiver

DATASET_START_TIMEOUT = 0.5
VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture(scope="module", params=["fast_path", "pynetdicom_path"])
def receiver(request, tmp_path_factory):
    """One in-process receiver per mode, shared by the module's tests."""
    tmp = tmp_path_factory.mktemp(request.param)
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 3600, "network_timeout": 5,
             "dataset_start_timeout": DATASET_START_TIMEOUT, "fast_path": request.param == "fast_path"},
        storage={"data_dir": str(tmp / "data"), "min_free_bytes": 0},
    )
    rx = Receiver(settings, lambda record: None)
    rx.start()
    yield rx
    rx.stop()


def held(rx: Receiver) -> tuple[int, int]:
    """The receiver's threads and this process's open descriptors once no association is open."""
    wait_until(lambda: not rx.ae.active_associations, 15, what="the associations to end")
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def assert_nothing_held(rx: Receiver, before: tuple[int, int]) -> None:
    """No thread, descriptor or incoming file is left once the associations ended."""
    wait_until(lambda: held(rx) == before, 15, what=f"threads and descriptors back to {before} (now {held(rx)})")
    assert not list(rx.layout.incoming.iterdir())


@pytest.mark.parametrize("maximum", [1, 6, None], ids=["max-length-1", "max-length-6", "no-max-length"])
def test_a_maximum_length_too_small_for_any_answer_is_refused_at_association(receiver, caplog, maximum):
    """pynetdicom cannot answer within 1-6 bytes (or with no Maximum Length): it aborted, and its
    association thread waited forever for itself, holding a thread and two descriptors."""
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    before = held(receiver)
    for _ in range(3):
        with pytest.raises(AssertionError, match=r"PDU type 3\)"):
            associate(receiver.settings.scp.port, max_pdu=maximum)
    assert_nothing_held(receiver, before)
    expected = "announces no Maximum Length" if maximum is None else f"announces a Maximum Length of {maximum} bytes"
    assert expected in caplog.text


@pytest.mark.parametrize("split", [False, True], ids=["command-whole", "command-split"])
def test_answers_fit_the_smallest_maximum_length_that_holds_a_byte(receiver, split):
    sock = associate(receiver.settings.scp.port, max_pdu=7)
    data, ds = ct_dataset()
    encoded = command(ds.SOPInstanceUID, 9)
    if split:
        sock.sendall(pdvs((CT_CONTEXT, 0x01, encoded[:40])))
    sock.sendall(pdvs((CT_CONTEXT, 0x03, encoded[40 if split else 0:]), (CT_CONTEXT, 0x02, data)))
    rsp = response(sock, max_pdu=7)
    assert (rsp.Status, rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPInstanceUID) == (0, 9, ds.SOPInstanceUID)
    release(sock)


def _store_command(sop_class: str = CT_IMAGE, instance: str | None = None, message_id: int | None = 5,
                   group_length: int | None = None) -> tuple[bytes, str]:
    instance = generate_uid() if instance is None else instance
    elements = [(0x0002, ui(sop_class)), (0x0100, us(0x0001))]
    if message_id is not None:
        elements.append((0x0110, us(message_id)))
    elements += [(0x0700, us(0)), (0x0800, us(0x0000)), (0x1000, ui(instance))]
    return command_set(*elements, group_length=group_length), instance


REFUSED_STORES = {
    # name: (command set, context, status the sender must get)
    "no-message-id": (lambda: _store_command(message_id=None), CT_CONTEXT, 0xC000),
    "empty-instance-uid": (lambda: _store_command(instance=""), CT_CONTEXT, 0xA900),
    "verification-sop-class": (lambda: _store_command(sop_class=VERIFICATION), ECHO_CONTEXT, 0x0122),
    "non-ascii-sop-class": (lambda: _store_command(sop_class=CT_IMAGE + ".\xe9"), CT_CONTEXT, 0x0122),
    "multi-valued-instance-uid": (lambda: _store_command(instance="1.2.3\\1.2.4"), CT_CONTEXT, 0xA900),
    "newline-in-instance-uid": (lambda: _store_command(instance="1.2.3\nFORGED"), CT_CONTEXT, 0xA900),
    "wrong-group-length": (lambda: _store_command(group_length=12), CT_CONTEXT, 0xC000),
}


@pytest.mark.parametrize("split", [False, True], ids=["command-whole", "command-split"])
@pytest.mark.parametrize("case", sorted(REFUSED_STORES))
def test_a_c_store_that_cannot_be_stored_is_answered_with_a_failure_and_leaves_nothing(receiver, caplog, case, split):
    caplog.set_level(logging.INFO, logger="pacsworker.scp")
    make, context_id, status = REFUSED_STORES[case]
    before = held(receiver)
    sock = associate(receiver.settings.scp.port)
    encoded, instance = make()
    data, _ = ct_dataset()
    if split:
        sock.sendall(pdvs((context_id, 0x01, encoded[:30])))
    sock.sendall(pdvs((context_id, 0x03, encoded[30 if split else 0:]), (context_id, 0x00, data[:1000])))
    sock.sendall(pdvs((context_id, 0x02, data[1000:])))
    rsp = response(sock)
    assert rsp.CommandField == 0x8001, "a C-STORE-RSP"
    assert rsp.Status == status
    assert rsp.MessageIDBeingRespondedTo == (0 if case == "no-message-id" else 5)
    # the association goes on: the next C-STORE is stored
    data, ds = ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds.SOPInstanceUID, 6)), (CT_CONTEXT, 0x02, data)))
    assert response(sock).Status == 0
    release(sock)
    assert_nothing_held(receiver, before)
    assert not list(receiver.layout.spool.rglob(f"{instance}.dcm"))
    assert f"answered 0x{status:04X}" in caplog.text
    assert wait_until(lambda: "released: 1 instance(s) stored, 1 refused" in caplog.text, 10, what="the tally logged")


def test_a_refused_c_store_whose_dataset_never_starts_is_answered(receiver):
    """Its refusal is sent after the dataset start timeout, as for a C-STORE that would be stored."""
    sock = associate(receiver.settings.scp.port)
    encoded, _ = _store_command(instance="")
    sock.sendall(pdvs((CT_CONTEXT, 0x03, encoded)))
    rsp = response(sock)  # before the network timeout would abort the association
    assert (rsp.CommandField, rsp.Status) == (0x8001, 0xA900)
    data, ds = ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds.SOPInstanceUID, 6)), (CT_CONTEXT, 0x02, data)))
    assert response(sock).Status == 0
    release(sock)


def test_a_dataset_fragment_before_any_command_is_refused(receiver, caplog):
    """It was glued onto the next C-STORE's dataset, stored and answered Success."""
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    sock = associate(receiver.settings.scp.port)
    data, ds = ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x00, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")))
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds.SOPInstanceUID, 1)), (CT_CONTEXT, 0x02, data)))
    assert read_pdu(sock)[0] in (0x07, 0)  # A-ABORT, or the connection closed after it
    sock.close()
    assert wait_until(lambda: "a dataset fragment before any command" in caplog.text, 10, what="the reason logged")
    assert not list(receiver.layout.spool.rglob(f"{ds.SOPInstanceUID}.dcm"))
    held(receiver)
    assert not list(receiver.layout.incoming.iterdir())


def test_a_command_with_a_wrong_group_length_is_refused(receiver, caplog):
    """A C-STORE is answered 0xC000 (above); any other command aborts its association."""
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    sock = associate(receiver.settings.scp.port)
    echo = bytearray(echo_command(1))
    echo[8:12] = struct.pack("<L", len(echo) - 12 + 2)
    sock.sendall(pdvs((ECHO_CONTEXT, 0x03, bytes(echo))))
    assert read_pdu(sock)[0] in (0x07, 0)
    sock.close()
    assert wait_until(lambda: "Command Group Length of" in caplog.text, 10, what="the reason logged")


def test_an_empty_first_fragment_starts_the_dataset(receiver):
    """A dataset whose first fragment is empty and whose rest comes after the dataset start timeout is
    received whole (it used to be answered as a C-STORE whose dataset never started)."""
    sock = associate(receiver.settings.scp.port)
    data, ds = ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds.SOPInstanceUID, 1)), (CT_CONTEXT, 0x00, b"")))
    time.sleep(DATASET_START_TIMEOUT * 3)  # a slow sender, past the start timeout
    sock.sendall(pdvs((CT_CONTEXT, 0x02, data)))
    assert response(sock).Status == 0
    release(sock)
    stored = receiver.layout.spool / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(stored).PixelData == ds.PixelData


MISLABELLED = [
    # (series with the real codec, the transfer syntax the sender claims)
    ("mr13_siemens_trio_4sl_jpeg_lossless", JPEG2000Lossless),
    ("mr12_siemens_trio_4sl_j2k_lossless", JPEGLSLossless),
    ("mr14_siemens_trio_4sl_jpegls_lossless", JPEGLosslessSV1),
    ("mr15_siemens_trio_4sl_rle", JPEG2000Lossless),
    ("mr12_siemens_trio_4sl_j2k_lossless", RLELossless),
]


@pytest.mark.parametrize(("series", "claimed"), MISLABELLED, ids=[f"{s[:4]}-as-{c.name}" for s, c in MISLABELLED])
def test_pixel_data_of_another_codec_than_the_transfer_syntax_is_refused(receiver, dicom_dir, caplog, series, claimed):
    from pydicom.filereader import _read_file_meta_info, read_preamble

    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    path = sorted((dicom_dir / series).glob("*.dcm"))[0]
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        body = fp.read()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spooled = set(receiver.layout.spool.rglob("*.dcm"))
    assert raw_store(receiver.settings.scp.port, body, ds.SOPInstanceUID, claimed, MRImageStorage) == 0xC000
    assert "does not match the transfer syntax" in caplog.text
    assert set(receiver.layout.spool.rglob("*.dcm")) == spooled
    # labelled with its own syntax, the same bytes are stored
    own = ds.file_meta.TransferSyntaxUID
    assert raw_store(receiver.settings.scp.port, body, ds.SOPInstanceUID, own, MRImageStorage) == 0
