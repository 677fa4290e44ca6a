"""C-STORE datasets written to disk as their fragments arrive, so memory stays bounded by the PDU size.

pynetdicom collects a dataset in memory until its last fragment; a peer sending a 10 GB dataset in
valid P-DATA-TF PDUs would make the receiver hold 10 GB. Here each C-STORE's dataset goes to a
file under ``data_dir/incoming`` (preamble and file meta first, then the fragments as received);
the Storage handler checks that file and renames it into the spool, or it is deleted.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from ..logs import printable
from .commands import (
    C_STORE_RQ_FIELD,
    StoreRefusal,
    command_fragments,
    command_group_length_error,
    read_command,
    store_refusal,
    store_response,
    us_value,
)
from .pynetdicom_adapter import (
    C_STORE,
    C_STORE_RQ,
    P_DATA,
    DIMSEMessage,
    DIMSEServiceProvider,
    accepted_context,
    create_file_meta,
    dataset_file,
    release_sent,
    serve_request,
    set_dataset_file,
)

log = logging.getLogger("pacsworker.scp")

PREAMBLE = b"\x00" * 128 + b"DICM"
PLACEHOLDER_UID = "0"  # for a command whose UIDs cannot go into a file meta: the instance is refused
MAX_COMMAND_BYTES = 64 * 1024  # a DIMSE command set is a few hundred bytes
MAX_IN_MEMORY_DATASET = 1 << 20  # datasets of anything but C-STORE (none this receiver serves)
# the longest idle wait of an association's loops: their timers and kill flags are checked this often
IDLE_WAIT = 0.02


class IncomingDataset:
    """One dataset being received: a file holding preamble, file meta and the fragments so far.

    It has the attributes pynetdicom's C-STORE path uses for a dataset kept in a file (``write``,
    ``file.flush``, ``close``, ``name``). A write the disk refuses (full, read-only) is remembered,
    not raised: the rest of the dataset is read and dropped, and the Storage handler answers with
    the error's status instead of the association being aborted.
    """

    def __init__(self, folder: Path, file_meta: bytes | None):
        """``file_meta``: None when the writer supplies the whole Part 10 file (a STOW-RS part)."""
        self.file = self  # pynetdicom flushes ``file``
        self.error: OSError | None = None
        self.received = 0
        self.fragments = 0  # an empty fragment still says the dataset has started
        self.name = ""
        self._fd: int | None = None
        try:
            self._fd, self.name = _create(folder)
        except OSError as exc:
            self.error = exc
        head = b"" if file_meta is None else PREAMBLE + file_meta
        self.dataset_offset = len(head)
        self.write(head)
        self.received = self.fragments = 0

    def write(self, fragment: bytes | memoryview) -> None:
        self.received += len(fragment)
        self.fragments += 1
        if self.error is None:
            view = memoryview(fragment)
            try:
                while view:  # unbuffered: fragments are large, and nothing waits in user space at sync
                    view = view[os.write(self.fileno(), view):]
            except OSError as exc:
                self.error = exc

    def flush(self) -> None:
        pass  # writes are unbuffered

    def fileno(self) -> int:
        """The open file (readable too, so that the handler can map it)."""
        if self._fd is None:
            raise ValueError(f"{self.name} is closed")
        return self._fd

    def sync(self) -> None:
        """fsync; raises the first error the disk gave."""
        if self.error is not None:
            raise self.error
        os.fsync(self.fileno())

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.close(fd)
        except OSError as exc:
            self.error = self.error or exc

    def discard(self) -> None:
        self.close()
        if self.name:
            Path(self.name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def mapped(self) -> Iterator[memoryview]:
        """The dataset as written (from ``dataset_offset``), mapped from the file: pages in only what is walked."""
        mapped = mmap.mmap(self.fileno(), 0, access=mmap.ACCESS_READ)
        whole = memoryview(mapped)
        dataset = whole[self.dataset_offset:]
        try:
            yield dataset
        finally:
            for resource in (dataset, whole, mapped):
                try:
                    resource.release() if isinstance(resource, memoryview) else resource.close()
                except BufferError:  # a view still referenced: the map closes when it is collected
                    pass


_SEQUENCE = itertools.count()


def _create(folder: Path) -> tuple[int, str]:
    """A new file ``in-<pid>-<n>.dcm`` in ``folder``; O_EXCL, so never one another process left."""
    while True:
        name = os.path.join(folder, f"in-{os.getpid()}-{next(_SEQUENCE)}.dcm")
        try:
            return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), name
        except FileExistsError:
            continue


INSTANCE_UID_ELEMENT = b"\x02\x00\x03\x00UI"  # (0002,0003) Media Storage SOP Instance UID, explicit VR LE


@functools.lru_cache(maxsize=256)
def _file_meta_template(sop_class_uid: str, syntax: str, uid_length: int) -> tuple[bytes, int]:
    """The file meta pydicom writes for an instance UID of ``uid_length`` bytes (padded), and where that UID goes."""
    meta = DicomBytesIO()
    write_file_meta_info(meta, create_file_meta(sop_class_uid=UID(sop_class_uid), sop_instance_uid=UID("1" * uid_length),
                                                transfer_syntax=UID(syntax)), enforce_standard=True)
    encoded = meta.getvalue()
    return encoded, encoded.index(INSTANCE_UID_ELEMENT + struct.pack("<H", uid_length)) + 8


def _file_meta(message, syntax: str) -> bytes:
    command = message.command_set
    try:
        sop_class, instance = str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID)
    except Exception:  # noqa: BLE001 - values pydicom cannot convert; refused later
        sop_class = instance = PLACEHOLDER_UID
    return file_meta_for(sop_class, instance, syntax)


def file_meta_for(sop_class: str, instance: str, syntax: str) -> bytes:
    """The encoded file meta (group 0002) for an instance of ``sop_class`` in ``syntax``.

    The UIDs come from the wire: ones pydicom cannot write get a placeholder, and the instance is
    refused later (its dataset does not match its command)."""
    try:
        encoded = instance.encode("ascii")
        encoded += b"\0" * (len(encoded) % 2)  # UI values are padded with NUL to even length
        # pydicom's encoding of the same meta with a placeholder of the same length: only the UID differs
        template, offset = _file_meta_template(sop_class, syntax, len(encoded))
        return template[:offset] + encoded + template[offset + len(encoded):]
    except Exception:  # noqa: BLE001 - UIDs from the wire that pydicom cannot write; refused later
        meta = DicomBytesIO()
        placeholder = UID(PLACEHOLDER_UID)
        write_file_meta_info(meta, create_file_meta(sop_class_uid=placeholder, sop_instance_uid=placeholder,
                                                    transfer_syntax=UID(syntax)), enforce_standard=True)
        return meta.getvalue()


class _RequestQueue(queue.Queue):
    """An association's received DIMSE requests; a C-STORE is served as it is put, in the thread that received it.

    pynetdicom hands each request to the association's own thread and its response back to the DUL's:
    two thread switches (and waits for the GIL) per instance, on the path the sender waits on.
    """

    def __init__(self, dimse: SpoolingDIMSE):
        super().__init__()
        self.dimse = dimse

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        context_id, request = item
        if not self.dimse.serve_now(request, context_id):
            super().put(item, block, timeout)


@dataclass
class RefusedStore:
    """A C-STORE refused by its command, whose dataset is read and dropped before it is answered."""

    refusal: StoreRefusal
    context_id: int
    fragments: int = 0


class SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider that gives every C-STORE dataset an :class:`IncomingDataset`,
    answers a C-STORE it must refuse before storage itself (:func:`commands.store_refusal`: pynetdicom
    would drop some unanswered, their dataset left on disk, or answer one with a C-ECHO-RSP), and aborts
    on what would grow in memory or be glued to another message (a huge command set, a dataset fragment
    without its command, a command inside a dataset, a command whose group length is wrong)."""

    def __init__(self, assoc, folder: Path, serve_in_dul: bool = True,
                 on_refused: Callable[[Any, StoreRefusal], None] | None = None):
        super().__init__(assoc)
        self.folder = folder
        self.serve_in_dul = serve_in_dul
        self.on_refused = on_refused
        self.msg_queue = _RequestQueue(self)
        # set by the DUL when the association's loop has something to do (see get_msg)
        self.wake: threading.Event = getattr(assoc.dul, "user_wake", None) or threading.Event()
        self._refused: RefusedStore | None = None

    @property
    def receiving(self) -> bool:
        """Whether a message, or the dataset of a refused C-STORE, is arriving."""
        return self.message is not None or self._refused is not None

    @property
    def refused_awaiting_dataset(self) -> RefusedStore | None:
        """The refused C-STORE whose dataset has not started, if any (the dataset start timeout applies to it too)."""
        refused = self._refused
        return refused if refused is not None and not refused.fragments else None

    def serve_now(self, request, context_id: int) -> bool:
        """Serve ``request`` in the calling (DUL) thread if it is a C-STORE pynetdicom would serve as a Storage
        SCP; the requests it would refuse or abort on go to the association's loop as usual."""
        if not self.serve_in_dul:
            return False
        if not isinstance(request, C_STORE) or not request.is_valid_request or release_sent(self.assoc):
            return False
        context = accepted_context(self.assoc, context_id)
        if context is None or context.abstract_syntax != request.AffectedSOPClassUID:
            return False
        serve_request(self.assoc, request, context_id)
        return True

    def receive_primitive(self, primitive: P_DATA) -> None:
        # one value at a time: a dataset's first fragment may share a PDU with its command
        for context_id, data in primitive.presentation_data_value_list:
            if self._take_here(context_id, data):
                if not cast(Any, self.assoc.dul).connected():
                    return
                continue
            single = P_DATA()
            single.presentation_data_value_list.append((context_id, data))
            super().receive_primitive(single)
            message: Any = self.message  # pynetdicom's private file attributes are typed for its own files
            if message is None:
                continue
            store: Any = message if isinstance(message, C_STORE_RQ) else None
            if store is not None and dataset_file(store) is None and not store.data_set.tell():
                context = accepted_context(self.assoc, store.context_id)
                if context is not None:  # else pynetdicom refuses the message itself
                    incoming = IncomingDataset(self.folder, _file_meta(store, context.transfer_syntax[0]))
                    set_dataset_file(store, incoming, Path(incoming.name))
            elif message.encoded_command_set.tell() > MAX_COMMAND_BYTES:
                cast(Any, self.assoc.dul).abort_peer(f"a DIMSE command set of more than {MAX_COMMAND_BYTES} bytes")
                return
            elif message.data_set.tell() > MAX_IN_MEMORY_DATASET:
                cast(Any, self.assoc.dul).abort_peer(
                    f"more than {MAX_IN_MEMORY_DATASET} bytes of dataset without a C-STORE command"
                )
                return
        if not self.msg_queue.empty():
            self.wake.set()

    def _take_here(self, context_id: int, data: bytes) -> bool:
        """Handle a PDV here instead of in pynetdicom: True when it was (dropped with a refused C-STORE's
        dataset, a refused C-STORE's command, or a protocol violation that aborted the association)."""
        control = data[0] if data else 0
        is_command = bool(control & 0x01)
        refused = self._refused
        if refused is not None:
            if is_command or context_id != refused.context_id:
                return self._abort("a PDV that is not the next fragment of the dataset being received")
            refused.fragments += 1
            if control & 0x02:
                self._refused = None
                self._answer(refused.refusal, refused.context_id)
            return True
        command_started = self.message is not None and type(self.message) is DIMSEMessage
        if not is_command:
            if self.message is not None and not command_started:
                return False  # the next fragment of the dataset pynetdicom is receiving
            return self._abort("a dataset fragment before its command was complete" if command_started
                               else "a dataset fragment before any command")
        if self.message is not None and not command_started:
            return self._abort("a command fragment inside the dataset being received")
        if not control & 0x02:
            return False
        encoded = (self.message.encoded_command_set.getvalue() if self.message is not None else b"") + data[1:]
        return self._refuse_command(context_id, encoded)

    def _refuse_command(self, context_id: int, encoded: bytes) -> bool:
        """Refuse a whole command set here if it must be (True): a C-STORE that :func:`store_refusal`
        refuses is answered (after its dataset, if it has one); another command with a wrong group length
        aborts the association."""
        command = read_command(encoded)
        if command is None:
            return False  # not a command set pynetdicom can decode either: it refuses it
        if us_value(command.get(0x0100)) != C_STORE_RQ_FIELD:
            error = command_group_length_error(encoded)
            return self._abort(f"a DIMSE command with {error}") if error else False
        context = accepted_context(self.assoc, context_id)
        refusal = store_refusal(encoded, command, context) if context is not None else None
        if refusal is None:
            return False
        self.message = None
        log.warning("refused C-STORE %s from %s (%s): %s; answered 0x%04X", printable(refusal.instance),
                    printable(self.assoc.requestor.ae_title or ""), self.assoc.requestor.address, refusal.reason,
                    refusal.status)
        if self.on_refused is not None:
            self.on_refused(self.assoc, refusal)
        if refusal.has_dataset:
            self._refused = RefusedStore(refusal, context_id)
        else:
            self._answer(refusal, context_id)
        return True

    def _abort(self, reason: str) -> bool:
        cast(Any, self.assoc.dul).abort_peer(reason)
        return True

    def _answer(self, refusal: StoreRefusal, context_id: int) -> None:
        """The failure C-STORE-RSP of a refused C-STORE, after anything pynetdicom has queued to send."""
        answer = store_response(refusal.message_id, refusal.sop_class, refusal.instance, refusal.status)
        for control, fragment in command_fragments(answer, self.maximum_pdu_size or 0):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, bytes([control]) + fragment))
            self.dul.send_pdu(pdata)

    def get_msg(self, block: bool = False):
        # pynetdicom's association loop polls this every millisecond; waiting here until a message is
        # complete (or the DUL has news for the loop) serves it the moment its last fragment arrives
        if not block and self.msg_queue.empty():
            self.wake.wait(IDLE_WAIT)
            self.wake.clear()
        return super().get_msg(block)

    def discard_unserved(self) -> None:
        """Delete the files of datasets the association ended before serving (partial or queued)."""
        pending = [self.message] + [item[1] for item in list(self.msg_queue.queue)]
        for message in pending:
            incoming = dataset_file(message)
            if isinstance(incoming, IncomingDataset):
                incoming.discard()
                log.info("dataset of an ended association discarded (%d bytes received)", incoming.received)


def dataset_started(message) -> bool:
    """Whether any fragment of a C-STORE's dataset has arrived."""
    incoming = dataset_file(message)
    if isinstance(incoming, IncomingDataset):
        return incoming.fragments > 0
    return bool(incoming) or bool(message.data_set.tell())
