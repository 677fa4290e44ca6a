"""The receiver's fast path for C-STORE in the data transfer phase.

pynetdicom turns every P-DATA-TF PDU into objects, runs it through its state machine, decodes each
DIMSE command set with pydicom and encodes each response the same way: about two thirds of the
receiver's CPU time per instance, all of it holding the GIL. On an established association the
receiver instead reads a C-STORE straight from the PDU it arrived in: the command set is walked
here (it is a handful of group 0000 elements in Implicit VR Little Endian, PS3.7 6.3.1), the
dataset's fragments go to their file as they arrive, and the response is built from its bytes.

Only the common, well-formed case takes this path: a C-STORE-RQ whose command set arrives whole in
one PDV, on an accepted context of the same SOP class, that announces a dataset. Anything else (a
C-ECHO, a command in several fragments, a dataset without a command, a PDU whose items do not add
up, any other DIMSE service) goes to pynetdicom as before, from the PDV where it starts; so does
everything while pynetdicom has a message of its own in progress.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import evt

from .commands import (
    C_STORE_RQ_FIELD,
    command_fragments,
    read_command,
    store_refusal,
    store_response,
    uid_value,
    us_value,
)
from .incoming import IncomingDataset, file_meta_for
from .pynetdicom_adapter import accepted_context, release_sent

log = logging.getLogger("pacsworker.scp")

STATUS_HANDLER_FAILED = 0xC211  # pynetdicom's answer when the C-STORE handler raised
_PDV = struct.Struct(">LBB")


def pdv_items(body: memoryview) -> list[tuple[int, int, int, int]] | None:
    """The PDV items of a P-DATA-TF body as ``(start, end, context_id, control)`` of each one's data,
    or None when the item lengths do not add up to the body (pynetdicom then refuses the PDU)."""
    items, offset, size = [], 0, len(body)
    while offset < size:
        if size - offset < 6:
            return None
        length, context_id, control = _PDV.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > size:
            return None
        items.append((offset + 6, end, context_id, control))
        offset = end
    return items or None


@dataclass
class StoreRequest:
    """A C-STORE-RQ as the Storage handler sees it (the attributes it reads of pynetdicom's ``C_STORE``)."""

    MessageID: int
    AffectedSOPClassUID: str
    AffectedSOPInstanceUID: str
    Priority: int
    context_id: int
    _dataset_file: IncomingDataset


def store_request(command: dict[int, bytes], context_id: int, folder: Path, transfer_syntax: str) -> StoreRequest:
    """A :class:`StoreRequest` with its incoming file opened, for a C-STORE-RQ :func:`store_refusal` passed."""
    sop_class, instance = uid_value(command.get(0x0002)) or "", uid_value(command.get(0x1000)) or ""
    incoming = IncomingDataset(folder, file_meta_for(sop_class, instance, transfer_syntax))
    message_id, priority = us_value(command.get(0x0110)) or 0, us_value(command.get(0x0700)) or 0
    return StoreRequest(message_id, sop_class, instance, priority, context_id, incoming)


def command_pdus(context_id: int, command: bytes, peer_max_length: int) -> bytes:
    """``command`` as P-DATA-TF PDUs no longer than the peer accepts (0: no limit), one PDV each."""
    return b"".join(struct.pack(">BBLLBB", 0x04, 0, len(chunk) + 6, len(chunk) + 2, context_id, control) + chunk
                    for control, chunk in command_fragments(command, peer_max_length))


def handler_status(result) -> int:
    """The status a Storage handler returned: an int, or a Dataset with Status."""
    status = getattr(result, "Status", result)
    try:
        return int(status) & 0xFFFF
    except (TypeError, ValueError):
        log.error("the C-STORE handler returned no usable status (%s); answering 0x%04X",
                  type(result).__name__, STATUS_HANDLER_FAILED)
        return STATUS_HANDLER_FAILED


class StoreEvent:
    """What the Storage handler reads of pynetdicom's ``Event`` for a C-STORE."""

    __slots__ = ("assoc", "request", "context")

    def __init__(self, assoc, request: StoreRequest, context):
        self.assoc, self.request, self.context = assoc, request, context


class FastStores:
    """An association's C-STOREs served straight from their PDUs (see the module's text).

    Parameters
    ----------
    assoc:
        The pynetdicom association (accepted contexts, the requestor's maximum PDU length, the
        Storage handler).
    folder:
        Where datasets are written as they arrive.
    send:
        Sends bytes to the peer; raises OSError when it cannot.
    """

    def __init__(self, assoc, folder: Path, send):
        self.assoc = assoc
        self.folder = folder
        self.send = send
        self.pending: StoreRequest | None = None  # its command arrived, its dataset is arriving
        self.violation: str | None = None  # set when the peer broke the protocol: the caller aborts

    def take(self, body: memoryview) -> int | None:
        """Serve what ``body`` (a P-DATA-TF PDU's items) carries; returns None when all of it was served
        here, or the offset into ``body`` of the first PDV item pynetdicom must have (with the rest)."""
        items = pdv_items(body)
        if items is None:
            return None if self._violated("a P-DATA-TF PDU whose item lengths do not add up") else 0
        for start, end, context_id, control in items:
            pending = self.pending
            if pending is not None:
                if control & 0x01 or context_id != pending.context_id:
                    self._violated("a PDV that is not the next fragment of the dataset being received")
                    return None
                pending._dataset_file.write(body[start:end])
                if control & 0x02:
                    self.serve()
                continue
            if control != 0x03 or not self._start(body[start:end], context_id):
                return start - 6  # not ours from here on: pynetdicom has it, as before
        return None

    def _violated(self, what: str) -> bool:
        if self.pending is None:
            return False  # pynetdicom's own checks answer it
        self.violation = f"{what} (C-STORE {self.pending.AffectedSOPInstanceUID} in progress)"
        return True

    def _start(self, data: memoryview, context_id: int) -> bool:
        context = accepted_context(self.assoc, context_id)
        if context is None or release_sent(self.assoc):
            return False
        command = read_command(data)
        if command is None or us_value(command.get(0x0100)) != C_STORE_RQ_FIELD or store_refusal(data, command, context):
            return False  # pynetdicom's path answers (SpoolingDIMSE refuses a C-STORE the same way)
        self.pending = store_request(command, context_id, self.folder, context.transfer_syntax[0])
        return True

    def dataset_started(self) -> bool:
        return self.pending is None or self.pending._dataset_file.fragments > 0

    def serve(self) -> None:
        """Hand the complete (or given up) dataset to the Storage handler and answer with its status."""
        request, self.pending = self.pending, None
        if request is None:
            return
        incoming = request._dataset_file
        handler, args = self.assoc.get_handlers(evt.EVT_C_STORE)
        context = accepted_context(self.assoc, request.context_id).as_tuple
        try:
            status = handler_status(handler(StoreEvent(self.assoc, request, context), *(args or ())))
        except Exception as exc:  # noqa: BLE001 - answer as pynetdicom does and keep serving
            log.error("C-STORE handler failed for %r: %s: %r", request.AffectedSOPInstanceUID, type(exc).__name__, str(exc))
            status = STATUS_HANDLER_FAILED
        maximum = self.assoc.requestor.maximum_length or 0
        try:
            answer = store_response(request.MessageID, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, status)
            self.send(command_pdus(request.context_id, answer, maximum))
        finally:
            incoming.discard()  # after the answer: nothing is left when the handler moved the file into the spool

    def discard(self) -> None:
        """Delete the file of a dataset the association ended before it was complete."""
        if self.pending is not None:
            incoming, self.pending = self.pending._dataset_file, None
            incoming.discard()
            log.info("dataset of an ended association discarded (%d bytes received)", incoming.received)
