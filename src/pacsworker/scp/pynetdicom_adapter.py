"""Every use the receiver makes of pynetdicom's internals, in one module.

The fast path (``wire``, ``datapath``, ``incoming``) replaces parts of pynetdicom's acceptor: its
DUL provider's reactor loop and PDU reads, the DIMSE provider's message assembly, and the request
handler that builds each association. pynetdicom has no public API for these, so the private names
and behaviours they rest on are reached here only, by name, and ``tests/test_pynetdicom_adapter.py``
asserts each one (it exists, takes these arguments, behaves so): a pynetdicom upgrade that changes
one fails there, naming it, instead of somewhere on the wire. Written against pynetdicom 3.0.
"""

from __future__ import annotations

import copy
import queue
from collections.abc import Callable
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

__all__ = [
    "C_STORE", "C_STORE_RQ", "DIMSEMessage", "DIMSEServiceProvider", "DULServiceProvider", "P_DATA",
    "AssociationSocket", "RequestHandler", "ThreadedAssociationServer", "create_file_meta", "make_target",
]

TESTED_WITH = "3.0"  # the pynetdicom release these assumptions were checked against


# -- the association --------------------------------------------------------------------------------
def accepted_context(assoc, context_id: int | None):
    """The accepted presentation context of that ID, or None."""
    return assoc._accepted_cx.get(context_id)


def release_sent(assoc) -> bool:
    """Whether the association is being released (pynetdicom ignores requests from then on)."""
    return bool(assoc._sent_release)


def abort_sent(assoc) -> bool:
    """Whether this side aborted the association."""
    return bool(getattr(assoc, "_sent_abort", False))


def serve_request(assoc, request, context_id: int) -> None:
    """pynetdicom's serving of a DIMSE request (its service class, handler and response), in the calling thread."""
    assoc._serve_request(request, context_id)


def mark_aborted(assoc) -> None:
    """The association's state after an abort its own loop did not go through."""
    assoc.is_aborted = True
    assoc.is_established = False
    assoc._kill = True


def copy_context(context):
    """A presentation context with its own list of transfer syntaxes (what pynetdicom's deep copy gives)."""
    twin = copy.copy(context)
    twin._transfer_syntax = list(context._transfer_syntax)
    return twin


def register_server(ae, server) -> None:
    """Let ``ae.shutdown()`` stop ``server`` as it stops the ones it started itself."""
    ae._servers.append(server)


# -- the DUL provider (the connection's thread) --------------------------------------------------------
class AdaptedDUL(DULServiceProvider):
    """pynetdicom's DUL provider with the private hooks the receiver overrides under public names."""

    def _read_pdu_data(self) -> None:  # pynetdicom's transport event reads a PDU through this
        self.read_pdu()

    def read_pdu(self) -> None:
        DULServiceProvider._read_pdu_data(self)

    def pynetdicom_transport_event(self) -> bool:
        """pynetdicom's own check for a transport event (it also handles a closing connection)."""
        return DULServiceProvider._is_transport_event(self)

    def connected(self) -> bool:
        return self.socket is not None and self.socket._is_connected

    def connection_lost(self) -> None:
        """Mark the connection gone without closing it (it already is)."""
        if self.socket is not None:
            self.socket._is_connected = False

    def close_connection(self) -> None:
        if self.socket is not None:
            self.socket._shutdown_socket()
            self.socket._is_connected = False

    def deliver_pdu(self, pdu_bytes: bytearray) -> None:
        """Decode a whole PDU and queue it, and its state machine event, as pynetdicom's read does.

        Raises
        ------
        Exception
            Whatever pynetdicom's decoder raises on malformed contents.
        """
        pdu, event = self._decode_pdu(pdu_bytes)
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def stop_reactor(self) -> None:
        self._kill_thread = True

    @property
    def reactor_stopping(self) -> bool:
        return bool(self._kill_thread)

    def reactor_loop(self, transport_event: Callable[[], bool], on_failure: Callable[[Exception], None]) -> None:
        """pynetdicom's reactor loop (``DULServiceProvider.run_reactor``): one outgoing primitive or one
        transport event, then one state machine event; without its sleep before a pass that found no
        event (``transport_event`` waits instead). ``on_failure`` gets an exception of the state machine,
        and the loop ends."""
        self._run_loop_delay = 0
        self._idle_timer.start()
        self.assoc._dul_ready.set()
        while not self._kill_thread:
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if not self._process_recv_primitive() and transport_event():
                    self._idle_timer.restart()
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    continue
                self.state_machine.do_action(event)
            except Exception as exc:  # noqa: BLE001 - the caller aborts the association and keeps serving
                on_failure(exc)
                self._kill_thread = True
                return


class AdaptedRequestHandler(RequestHandler):
    """pynetdicom's per-connection handler; ``adapt_association`` gets each association it builds."""

    def _create_association(self):  # pynetdicom's hook for the association of a new connection
        return self.adapt_association(super()._create_association())

    def adapt_association(self, assoc):
        return assoc


def install_dul(assoc, dul: DULServiceProvider) -> None:
    """Put ``dul`` in place of the association's own provider, which has not started: it takes over the
    connection and the transport-open event already queued, and the association's timeouts."""
    plain = assoc.dul
    dul.event_queue = plain.event_queue
    dul.socket = plain.socket
    assoc.dul = dul
    assoc.acse_timeout = assoc.acse_timeout  # re-applied: they reach the new provider's timers
    assoc.network_timeout = assoc.network_timeout


# -- DIMSE messages ------------------------------------------------------------------------------------
def dataset_file(message) -> Any:
    """The file a message's (or a C-STORE request's) dataset is written to as it arrives, if any."""
    found = getattr(message, "_data_set_file", None)
    return found if found is not None else getattr(message, "_dataset_file", None)


def set_dataset_file(message, file, path) -> None:
    """Have pynetdicom write a message's dataset fragments to ``file`` (pynetdicom's chunked receive)."""
    message._data_set_file = file
    message._data_set_path = path


def is_storage_class(uid: str) -> bool:
    """Whether pynetdicom serves ``uid`` as a storage SOP class."""
    return uid_to_service_class(uid) is StorageServiceClass
