"""Hand-built upper-layer PDUs and C-STORE payloads for the hostile-peer tests (real bytes, no SCU)."""

from __future__ import annotations

import socket
import struct
import time
import zlib
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"
EXPLICIT_LE = b"1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CT_CONTEXT, ECHO_CONTEXT = 1, 3


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _ae(title: bytes) -> bytes:
    return title[:16].ljust(16, b" ")


def associate_rq(called: bytes = b"PACSWORKER", calling: bytes = b"SCU", abstract: bytes = VERIFICATION,
                 syntax: bytes = IMPLICIT_LE) -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context (id 1)."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, abstract) + _item(0x40, syntax)
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433")
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32
    body += _item(0x10, APPLICATION_CONTEXT) + _item(0x20, context) + _item(0x50, user)
    return pdu(0x01, body)


def read_pdu(sock: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    """One PDU from the peer as (type, body); (0, b"") when the connection closed instead."""
    sock.settimeout(timeout)
    header = _recv(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _recv(sock, length)


def _recv(sock: socket.socket, count: int) -> bytes:
    buf = b""
    while len(buf) < count:
        try:
            chunk = sock.recv(count - len(buf))
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return buf


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def associated(port: int, abstract: bytes = VERIFICATION, syntax: bytes = IMPLICIT_LE) -> socket.socket:
    """A raw connection with an established association (presentation context 1)."""
    sock = connect(port)
    sock.sendall(associate_rq(abstract=abstract, syntax=syntax))
    pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x02, f"association not accepted (PDU type {pdu_type})"
    return sock


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closed ``sock`` (reads and discards whatever it sends first)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def deflate_bomb(inflated_pixel_bytes: int = 1 << 30) -> tuple[bytes, str]:
    """A CT dataset whose pixel data is ``inflated_pixel_bytes`` of zeros, deflated (raw deflate).

    Returns the deflated dataset and its SOP Instance UID.
    """
    columns = 32768
    rows = inflated_pixel_bytes // (columns * 2)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = rows, columns, 16, 16, 15, 0
    pixel_header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, rows * columns * 2)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [deflater.compress(explicit_le(ds) + pixel_header)]
    zeros = bytes(16 << 20)
    remaining = rows * columns * 2
    while remaining:
        step = min(remaining, len(zeros))
        out.append(deflater.compress(zeros[:step]))
        remaining -= step
    out.append(deflater.flush())
    return b"".join(out), str(ds.SOPInstanceUID)


def explicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()



def raw_store(port: int, payload: bytes, sop_uid: str, syntax: str, sop_class: str = CT_IMAGE,
              aet: str = "SCU") -> int:
    """Send one C-STORE whose dataset is ``payload`` exactly as given; returns the response status."""
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title=aet)
    ae.add_requested_context(sop_class, syntax)
    ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSWORKER")
    assert assoc.is_established, "association refused"
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, sop_uid
    request.DataSet = BytesIO(payload)
    context = assoc.accepted_contexts[0]
    assoc._reactor_checkpoint.clear()  # as send_c_store does: keep the reactor off our response
    while not assoc._is_paused:
        time.sleep(0.001)
    assoc.dimse.send_msg(request, context.context_id)
    _, response = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    assoc.release()
    return int(response.Status) if response is not None else -1


def pdv_pdu(control: int, data: bytes, context_id: int = 1) -> bytes:
    """A P-DATA-TF holding one value: control 0x03 last command fragment, 0x00/0x02 dataset fragments."""
    return pdu(0x04, struct.pack(">LBB", len(data) + 2, context_id, control) + data)


def store_command(sop_uid: str, sop_class: str = CT_IMAGE) -> bytes:
    """An encoded C-STORE-RQ command set announcing a dataset."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, sop_uid
    request.DataSet = BytesIO(b"\0")  # marks the command as carrying a dataset
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return encode(message.command_set, True, True)


def stream_store(port: int, dataset_head: bytes, tail_zeros: int, sop_uid: str, sop_class: str = CT_IMAGE,
                 fragment: int = 65536) -> int:
    """A C-STORE over a raw association whose dataset is ``dataset_head`` then ``tail_zeros`` zero
    bytes, sent fragment by fragment without ever holding the dataset; returns the status."""
    from pydicom.filereader import read_dataset

    sock = associated(port, abstract=sop_class.encode(), syntax=EXPLICIT_LE)
    sock.sendall(pdv_pdu(0x03, store_command(sop_uid, sop_class)))
    sock.sendall(pdv_pdu(0x00, dataset_head))
    zeros = bytes(fragment)
    remaining = tail_zeros
    while remaining:
        step = min(remaining, fragment)
        remaining -= step
        sock.sendall(pdv_pdu(0x02 if not remaining else 0x00, zeros[:step]))
    pdu_type, body = read_pdu(sock, timeout=120)
    sock.close()
    assert pdu_type == 0x04, f"no C-STORE response (PDU type {pdu_type})"
    command = read_dataset(BytesIO(body[6:]), True, True)
    return int(command.Status)


def associate(port: int, max_pdu: int | None = 16384):
    """A raw association proposing CT Image Storage (context 1, explicit VR LE) and Verification (context 3);
    ``max_pdu`` None sends no Maximum Length."""
    contexts = b""
    proposed = ((CT_CONTEXT, CT_IMAGE.encode(), EXPLICIT_LE), (ECHO_CONTEXT, VERIFICATION, IMPLICIT_LE))
    for context_id, abstract, syntax in proposed:
        contexts += _item(0x20, bytes([context_id, 0, 0, 0]) + _item(0x30, abstract) + _item(0x40, syntax))
    user = _item(0x52, b"1.2.826.0.1.3680043.9.7433")
    if max_pdu is not None:
        user = _item(0x51, struct.pack(">L", max_pdu)) + user
    body = struct.pack(">HH", 1, 0) + _ae(b"PACSWORKER") + _ae(b"SCU") + b"\0" * 32
    sock = connect(port)
    sock.sendall(pdu(0x01, body + _item(0x10, APPLICATION_CONTEXT) + contexts + _item(0x50, user)))
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == 0x02, f"association not accepted (PDU type {pdu_type})"
    return sock


def release(sock) -> None:
    sock.sendall(pdu(0x05, b"\0" * 4))  # A-RELEASE-RQ
    assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP
    sock.close()


def pdvs(*values: tuple[int, int, bytes]) -> bytes:
    """One P-DATA-TF holding the given (context id, control, data) values."""
    return pdu(0x04, b"".join(struct.pack(">LBB", len(data) + 2, cid, control) + data for cid, control, data in values))


def command(sop_uid: str, message_id: int) -> bytes:
    encoded = bytearray(store_command(sop_uid))
    at = encoded.index(b"\x00\x00\x10\x01")  # (0000,0110) Message ID
    encoded[at + 8:at + 10] = struct.pack("<H", message_id)
    return bytes(encoded)


def echo_command(message_id: int) -> bytes:
    body = b"".join((
        struct.pack("<HHL", 0, 0x0002, 18) + VERIFICATION + b"\0",
        struct.pack("<HHLH", 0, 0x0100, 2, 0x0030),
        struct.pack("<HHLH", 0, 0x0110, 2, message_id),
        struct.pack("<HHLH", 0, 0x0800, 2, 0x0101),
    ))
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def response(sock, max_pdu: int = 0) -> pydicom.Dataset:
    """The next DIMSE response, reassembled from its fragments (each PDU's variable field, the part the
    maximum length limits (PS3.8 D.1), no longer than ``max_pdu``)."""
    encoded = b""
    while True:
        pdu_type, body = read_pdu(sock, timeout=30)
        assert pdu_type == 0x04, f"expected P-DATA-TF, got PDU type {pdu_type}"
        assert not max_pdu or len(body) <= max_pdu
        (length, _, control) = struct.unpack(">LBB", body[:6])
        encoded += body[6:4 + length]
        if control == 0x03:
            return read_dataset(BytesIO(encoded), True, True)


def ct_dataset() -> tuple[bytes, pydicom.Dataset]:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelData = bytes(range(256)) * 32
    return explicit_le(ds), ds


def command_set(*elements: tuple[int, bytes], group_length: int | None = None) -> bytes:
    """A command set of group 0000 elements given as (element, value bytes), Command Group Length first
    (the right one unless ``group_length`` says otherwise)."""
    body = b"".join(struct.pack("<HHL", 0, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHLL", 0, 0, 4, len(body) if group_length is None else group_length) + body


def ui(value: str) -> bytes:
    raw = value.encode("latin-1")
    return raw + b"\0" * (len(raw) % 2)


def us(value: int) -> bytes:
    return struct.pack("<H", value)
