"""C-STORE datasets written to disk as their fragments arrive, so memory stays bounded by the PDU size.

pynetdicom collects a dataset in memory until its last fragment; a peer sending a 10 GB dataset in
valid P-DATA-TF PDUs would make the receiver hold 10 GB. Here each C-STORE's dataset goes to a
file under ``data_dir/incoming`` (preamble and file meta first, then the fragments as received);
the Storage handler checks that file and renames it into the spool, or it is deleted.
"""

from __future__ import annotations

import logging
import os
import tempfile
from io import BytesIO
from pathlib import Path

from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("pacsworker.scp")

PREAMBLE = b"\x00" * 128 + b"DICM"
PLACEHOLDER_UID = "0"  # for a command whose UIDs cannot go into a file meta: the instance is refused
MAX_COMMAND_BYTES = 64 * 1024  # a DIMSE command set is a few hundred bytes
MAX_IN_MEMORY_DATASET = 1 << 20  # datasets of anything but C-STORE (none this receiver serves)


class IncomingDataset:
    """One dataset being received: a file holding preamble, file meta and the fragments so far.

    It has the attributes pynetdicom's C-STORE path uses for a dataset kept in a file (``write``,
    ``file.flush``, ``close``, ``name``). A write the disk refuses (full, read-only) is remembered,
    not raised: the rest of the dataset is read and dropped, and the Storage handler answers with
    the error's status instead of the association being aborted.
    """

    def __init__(self, folder: Path, file_meta: bytes):
        self.file = self  # pynetdicom flushes ``file``
        self.error: OSError | None = None
        self.received = 0
        self.name = ""
        self._handle = None
        try:
            fd, self.name = tempfile.mkstemp(prefix="in-", suffix=".dcm", dir=folder)
            self._handle = os.fdopen(fd, "wb")
        except OSError as exc:
            self.error = exc
        self.dataset_offset = len(PREAMBLE) + len(file_meta)
        self.write(PREAMBLE + file_meta)
        self.received = 0

    def write(self, fragment: bytes) -> None:
        self.received += len(fragment)
        if self.error is None:
            try:
                self._handle.write(fragment)
            except OSError as exc:
                self.error = exc

    def flush(self) -> None:
        if self.error is None:
            try:
                self._handle.flush()
            except OSError as exc:
                self.error = exc

    def sync(self) -> None:
        """Flush and fsync; raises the first error the disk gave."""
        self.flush()
        if self.error is not None:
            raise self.error
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is None:
            return
        try:
            self._handle.close()
        except OSError as exc:  # a full disk can refuse the last buffered bytes here
            self.error = self.error or exc

    def discard(self) -> None:
        self.close()
        if self.name:
            Path(self.name).unlink(missing_ok=True)


def _file_meta(message, syntax: str) -> bytes:
    command = message.command_set
    meta = BytesIO()
    try:
        values = (UID(str(command.AffectedSOPClassUID)), UID(str(command.AffectedSOPInstanceUID)))
        write_file_meta_info(meta, create_file_meta(sop_class_uid=values[0], sop_instance_uid=values[1],
                                                    transfer_syntax=syntax), enforce_standard=True)
    except Exception:  # noqa: BLE001 - UIDs from the wire that pydicom cannot write; refused later
        meta = BytesIO()
        placeholder = UID(PLACEHOLDER_UID)
        write_file_meta_info(meta, create_file_meta(sop_class_uid=placeholder, sop_instance_uid=placeholder,
                                                    transfer_syntax=syntax), enforce_standard=True)
    return meta.getvalue()


class SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider that gives every C-STORE dataset an :class:`IncomingDataset`
    and aborts a message that would grow in memory (a huge command set, a dataset without a
    command, a dataset of another service)."""

    def __init__(self, assoc, folder: Path):
        super().__init__(assoc)
        self.folder = folder

    def receive_primitive(self, primitive: P_DATA) -> None:
        # one value at a time: a dataset's first fragment may share a PDU with its command
        for value in primitive.presentation_data_value_list:
            single = P_DATA()
            single.presentation_data_value_list.append(value)
            super().receive_primitive(single)
            message = self.message
            if message is None:
                continue
            if isinstance(message, C_STORE_RQ) and message._data_set_file is None and not message.data_set.tell():
                context = self.assoc._accepted_cx.get(message.context_id)
                if context is not None:  # else pynetdicom refuses the message itself
                    message._data_set_file = IncomingDataset(self.folder, _file_meta(message, context.transfer_syntax[0]))
                    message._data_set_path = Path(message._data_set_file.name)
            elif message.encoded_command_set.tell() > MAX_COMMAND_BYTES:
                self.assoc.dul.abort_peer(f"a DIMSE command set of more than {MAX_COMMAND_BYTES} bytes")
                return
            elif message.data_set.tell() > MAX_IN_MEMORY_DATASET:
                self.assoc.dul.abort_peer(
                    f"more than {MAX_IN_MEMORY_DATASET} bytes of dataset without a C-STORE command"
                )
                return

    def discard_unserved(self) -> None:
        """Delete the files of datasets the association ended before serving (partial or queued)."""
        pending = [self.message] + [item[1] for item in list(self.msg_queue.queue)]
        for message in pending:
            incoming = getattr(message, "_data_set_file", None)
            if isinstance(incoming, IncomingDataset):
                incoming.discard()
                log.info("dataset of an ended association discarded (%d bytes received)", incoming.received)


def dataset_started(message) -> bool:
    """Whether any fragment of a C-STORE's dataset has arrived."""
    incoming = message._data_set_file
    if isinstance(incoming, IncomingDataset):
        return incoming.received > 0
    return bool(incoming) or bool(message.data_set.tell())
