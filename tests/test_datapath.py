"""The receiver's C-STORE fast path (scp/datapath.py) and its hand-over to pynetdicom, on raw associations.

Every case checks what the sender sees (the responses, their statuses and message IDs) and what
was stored (the bytes sent, under the right file meta); the counts of requests each path served
show which one did.
"""

from __future__ import annotations

import logging
import struct

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import free_port, wait_until
from pacsworker.config import Settings
from pacsworker.scp import datapath, incoming
from pacsworker.scp.server import Receiver
from wire_bytes import (
    CT_CONTEXT,
    CT_IMAGE,
    ECHO_CONTEXT,
    associate,
    command,
    ct_dataset,
    echo_command,
    explicit_le,
    pdvs,
    read_pdu,
    release,
    response,
)


@pytest.fixture
def receiver(tmp_path):
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 3600},
        storage={"data_dir": str(tmp_path / "data")},
    )
    rx = Receiver(settings, lambda record: None)
    rx.start()
    yield rx
    # every association ended (and logged its end) before the next test captures the log
    wait_until(lambda: not rx.ae.active_associations, 15, what="the test's associations to end")
    rx.stop()


@pytest.fixture
def served(monkeypatch):
    """Counts of C-STOREs served by the fast path and by pynetdicom's."""
    counts = {"fast": 0, "pynetdicom": 0}
    fast_serve, slow_serve = datapath.FastStores.serve, incoming.SpoolingDIMSE.serve_now

    def counting_fast(self):
        counts["fast"] += 1
        return fast_serve(self)

    def counting_slow(self, request, context_id):
        served_here = slow_serve(self, request, context_id)
        counts["pynetdicom"] += served_here
        return served_here

    monkeypatch.setattr(datapath.FastStores, "serve", counting_fast)
    monkeypatch.setattr(incoming.SpoolingDIMSE, "serve_now", counting_slow)
    return counts


def stored(rx: Receiver, ds: pydicom.Dataset) -> pydicom.FileDataset:
    path = rx.layout.spool / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    return pydicom.dcmread(path)


def test_fast_path_and_pynetdicom_serve_one_association_in_turn(receiver, served):
    """Whole commands take the fast path; a split command and a C-ECHO go to pynetdicom; the
    responses come back in order with their own message IDs, and every instance is stored as sent."""
    sock = associate(receiver.settings.scp.port)
    sent = []

    # 1: command whole in one PDV, dataset in three fragments over three PDUs
    data, ds = ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds.SOPInstanceUID, 1))))
    third = len(data) // 3
    for start, control in ((0, 0x00), (third, 0x00), (2 * third, 0x02)):
        sock.sendall(pdvs((CT_CONTEXT, control, data[start:start + third if control == 0x00 else None])))
    rsp = response(sock)
    assert (rsp.Status, rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPInstanceUID) == (0, 1, ds.SOPInstanceUID)
    sent.append((data, ds))

    # 2: the command in two fragments: pynetdicom's
    data, ds = ct_dataset()
    encoded = command(ds.SOPInstanceUID, 2)
    sock.sendall(pdvs((CT_CONTEXT, 0x01, encoded[:40])))
    sock.sendall(pdvs((CT_CONTEXT, 0x03, encoded[40:])))
    sock.sendall(pdvs((CT_CONTEXT, 0x02, data)))
    rsp = response(sock)
    assert (rsp.Status, rsp.MessageIDBeingRespondedTo) == (0, 2)
    sent.append((data, ds))

    # 3: a C-ECHO
    sock.sendall(pdvs((ECHO_CONTEXT, 0x03, echo_command(3))))
    rsp = response(sock)
    assert (rsp.Status, rsp.MessageIDBeingRespondedTo, rsp.CommandField) == (0, 3, 0x8030)

    # 4 and 5: two whole instances in one PDU, then a C-ECHO in the same PDU after them
    (data4, ds4), (data5, ds5) = ct_dataset(), ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds4.SOPInstanceUID, 4)), (CT_CONTEXT, 0x02, data4),
                      (CT_CONTEXT, 0x03, command(ds5.SOPInstanceUID, 5)), (CT_CONTEXT, 0x02, data5),
                      (ECHO_CONTEXT, 0x03, echo_command(6))))
    answers = [response(sock) for _ in range(3)]
    assert [(a.Status, a.MessageIDBeingRespondedTo) for a in answers] == [(0, 4), (0, 5), (0, 6)]
    sent += [(data4, ds4), (data5, ds5)]

    release(sock)

    assert served == {"fast": 3, "pynetdicom": 1}
    for data, ds in sent:
        file = stored(receiver, ds)
        assert file.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert file.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert file.PixelData == ds.PixelData
        assert explicit_le(file) == data  # the dataset exactly as it was sent
    assert not list(receiver.layout.incoming.iterdir())


def test_a_command_inside_a_dataset_aborts_and_leaves_nothing(receiver, caplog):
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    sock = associate(receiver.settings.scp.port)
    data, ds = ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds.SOPInstanceUID, 1)), (CT_CONTEXT, 0x00, data[:100])))
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(generate_uid(), 2))))
    assert read_pdu(sock)[0] == 0x07  # A-ABORT
    sock.close()
    assert "a PDV that is not the next fragment of the dataset being received" in caplog.text
    assert wait_until(lambda: not list(receiver.layout.incoming.iterdir()), 10, what="the partial dataset removed")
    assert not list(receiver.layout.spool.rglob("*.dcm"))


def test_responses_fit_the_senders_maximum_pdu(receiver, served):
    """A sender that accepts only 64-byte PDUs gets its C-STORE response in fragments that fit."""
    sock = associate(receiver.settings.scp.port, max_pdu=64)
    data, ds = ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds.SOPInstanceUID, 7)), (CT_CONTEXT, 0x02, data)))
    rsp = response(sock, max_pdu=64)
    assert (rsp.Status, rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPInstanceUID) == (0, 7, ds.SOPInstanceUID)
    assert rsp.AffectedSOPClassUID == CT_IMAGE
    release(sock)
    assert served["fast"] == 1
    assert stored(receiver, ds).PixelData == ds.PixelData


def test_a_command_pynetdicom_cannot_decode_aborts_only_its_association(receiver, caplog):
    """A whole command set without Command Field goes to pynetdicom, which cannot handle it: that
    association is aborted with a reason in the log, and the receiver serves the next one."""
    caplog.set_level(logging.ERROR, logger="pacsworker.scp")
    sock = associate(receiver.settings.scp.port)
    no_command_field = struct.pack("<HHLL", 0, 0, 4, 10) + struct.pack("<HHLH", 0, 0x0110, 2, 1)
    sock.sendall(pdvs((CT_CONTEXT, 0x03, no_command_field)))
    assert read_pdu(sock)[0] in (0x07, 0)  # A-ABORT, or the connection closed after it
    sock.close()
    assert wait_until(lambda: "a message its upper layer could not handle" in caplog.text, 10, what="the abort logged")
    sock = associate(receiver.settings.scp.port)
    data, ds = ct_dataset()
    sock.sendall(pdvs((CT_CONTEXT, 0x03, command(ds.SOPInstanceUID, 1)), (CT_CONTEXT, 0x02, data)))
    assert response(sock).Status == 0
    release(sock)
