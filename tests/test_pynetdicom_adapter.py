"""Each assumption scp/pynetdicom_adapter.py makes about pynetdicom: the names exist, take these
arguments and behave so. A pynetdicom upgrade that changes one fails here, by name.

The live checks look at an acceptor association of a running receiver, held open by a real
requestor on a loopback port.
"""

from __future__ import annotations

import inspect
import queue
import threading
from io import BytesIO

import pytest
from conftest import free_port, wait_until
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ as C_STORE_RQ_MESSAGE
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from wire_bytes import CT_IMAGE, store_command

from pacsworker.config import Settings
from pacsworker.scp import pynetdicom_adapter as adapter
from pacsworker.scp.server import Receiver
from pacsworker.scp.wire import GuardedDUL


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize(("owner", "name", "expected"), [
    (DULServiceProvider, "__init__", ["self", "assoc"]),
    (DULServiceProvider, "_read_pdu_data", ["self"]),
    (DULServiceProvider, "_is_transport_event", ["self"]),
    (DULServiceProvider, "_decode_pdu", ["self", "bytestream"]),
    (DULServiceProvider, "_process_recv_primitive", ["self"]),
    (DULServiceProvider, "run_reactor", ["self"]),
    (DULServiceProvider, "kill_dul", ["self"]),
    (DULServiceProvider, "stop_dul", ["self"]),
    (DULServiceProvider, "send_pdu", ["self", "primitive"]),
    (RequestHandler, "_create_association", ["self"]),
    (adapter.DIMSEServiceProvider, "__init__", ["self", "assoc"]),
    (adapter.DIMSEServiceProvider, "receive_primitive", ["self", "primitive"]),
    (adapter.DIMSEServiceProvider, "get_msg", ["self", "block"]),
    (DIMSEMessage, "decode_msg", ["self", "primitive", "assoc"]),
    (AE, "make_server", ["self", "address", "ae_title", "contexts", "ssl_context", "evt_handlers", "server_class"]),
])
def test_the_names_and_signatures_the_adapter_calls_or_overrides(owner, name, expected):
    function = getattr(owner, name)
    assert parameters(function)[:len(expected)] == expected, f"{owner.__name__}.{name}"


def test_make_server_passes_a_request_handler_to_the_server_class():
    """start_guarded_server gives make_server ``request_handler`` (its **kwargs reach the server class)."""
    assert "kwargs" in parameters(AE.make_server)
    assert "request_handler" in parameters(ThreadedAssociationServer.__init__)


def test_pynetdicoms_reactor_loop_still_does_what_the_copy_does():
    """GuardedDUL runs its own copy of this loop (reactor_loop): the steps must be the same."""
    source = inspect.getsource(DULServiceProvider.run_reactor)
    for step in ("self._idle_timer.start()", "self.assoc._dul_ready.set()", "self._kill_thread",
                 "self.artim_timer.expired", 'self.event_queue.put("Evt18")', "self._process_recv_primitive()",
                 "self._is_transport_event()", "self._idle_timer.restart()", "self.event_queue.get(block=False)",
                 "self.state_machine.do_action(event)"):
        assert step in source, step


def test_pynetdicoms_transport_event_reads_pdus_through_the_overridden_hook():
    assert "self._read_pdu_data()" in inspect.getsource(DULServiceProvider._is_transport_event)
    assert "self._create_association()" in inspect.getsource(RequestHandler.handle)


def test_kill_waits_for_stop_dul_which_waits_for_the_dul_thread():
    """Why GuardedDUL.stop_dul returns at once in its own thread: pynetdicom's abort from a request served
    there would otherwise wait for that thread to end, forever."""
    assert "while self.is_alive()" in inspect.getsource(DULServiceProvider.stop_dul)
    assert "self.dul.stop_dul()" in inspect.getsource(Association.kill)


def test_no_response_fits_a_maximum_length_below_7():
    """The receiver refuses such associations (wire.MIN_PEER_MAXIMUM_LENGTH) because pynetdicom cannot answer."""
    message = DIMSEMessage()
    with pytest.raises(ValueError):
        list(message._generate_pdv_fragments(b"x" * 20, 6))
    assert list(message._generate_pdv_fragments(b"xy", 7)) == [b"x", b"y"]


def test_storage_and_verification_service_classes():
    assert adapter.is_storage_class(CT_IMAGE)
    assert not adapter.is_storage_class(str(Verification))
    assert adapter.uid_to_service_class(CT_IMAGE) is StorageServiceClass


class _Collecting:
    """A file as pynetdicom's chunked receive uses it (``write``, ``file.flush``)."""

    def __init__(self):
        self.file, self.parts = self, []

    def write(self, data):
        self.parts.append(bytes(data))

    def flush(self):
        pass


def test_decode_msg_writes_dataset_fragments_to_the_message_file_it_is_given():
    """SpoolingDIMSE gives each C-STORE an IncomingDataset through ``set_dataset_file``: pynetdicom
    must then write every dataset fragment there, not to memory."""
    command = P_DATA()
    command.presentation_data_value_list.append((1, b"\x03" + store_command("1.2.3")))
    message = DIMSEMessage()
    assert not message.decode_msg(command)  # the command, without its dataset yet
    assert isinstance(message, C_STORE_RQ_MESSAGE)
    collected = _Collecting()
    adapter.set_dataset_file(message, collected, "/nonexistent")
    for control, data in ((b"\x00", b"first"), (b"\x02", b"last")):
        fragment = P_DATA()
        fragment.presentation_data_value_list.append((1, control + data))
        done = message.decode_msg(fragment)
    assert done and collected.parts == [b"first", b"last"]
    assert not message.data_set.tell()
    primitive = message.message_to_primitive()
    assert isinstance(primitive, C_STORE) and adapter.dataset_file(primitive) is collected


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A receiver, and the acceptor side of an association a real requestor holds open."""
    settings = Settings(scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 3600},
                        storage={"data_dir": str(tmp_path_factory.mktemp("adapter") / "data")})
    rx = Receiver(settings, lambda record: None)
    rx.start()
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.scp.port, ae_title="PACSWORKER")
    assert assoc.is_established
    [acceptor] = wait_until(lambda: rx.ae.active_associations, 10, what="the acceptor association")
    yield rx, acceptor
    assoc.release()
    rx.stop()


def test_the_association_has_what_the_adapter_reads(live):
    rx, assoc = live
    assert isinstance(assoc._accepted_cx, dict)
    context = adapter.accepted_context(assoc, assoc.accepted_contexts[0].context_id)
    assert context is assoc.accepted_contexts[0] and adapter.accepted_context(assoc, 255) is None
    assert isinstance(context._transfer_syntax, list) and context.as_tuple.abstract_syntax == context.abstract_syntax
    twin = adapter.copy_context(context)
    assert twin._transfer_syntax == context._transfer_syntax and twin._transfer_syntax is not context._transfer_syntax
    assert adapter.release_sent(assoc) is False and adapter.abort_sent(assoc) is False
    assert parameters(assoc._serve_request) == ["msg", "context_id"]
    assert isinstance(assoc._dul_ready, threading.Event) and assoc._kill is False
    assert assoc.requestor.maximum_length == 16382  # what the requestor announced
    assert assoc.requestor.address_info.address == "127.0.0.1" and assoc.requestor.primitive is not None
    handler, _ = assoc.get_handlers(evt.EVT_C_STORE)
    assert callable(handler)
    assert isinstance(rx.ae._servers, list) and rx.ae._servers


def test_the_dul_provider_has_what_the_adapter_reads(live):
    _, assoc = live
    dul = assoc.dul
    assert isinstance(dul, GuardedDUL) and dul.is_alive()
    assert isinstance(dul.socket, AssociationSocket) and dul.socket._is_connected is True and dul.connected()
    assert dul.socket.socket is not None and isinstance(dul.socket.ready, bool)
    assert callable(dul.socket._shutdown_socket)
    for name in ("_recv_pdu", "event_queue", "to_provider_queue", "to_user_queue"):
        assert isinstance(getattr(dul, name), queue.Queue), name
    assert dul._kill_thread is False and dul.reactor_stopping is False
    assert callable(dul._idle_timer.start) and callable(dul._idle_timer.restart)
    assert isinstance(dul.artim_timer.expired, bool)
    assert dul.state_machine.current_state == "Sta6"


def test_the_dimse_provider_has_what_the_adapter_reads(live):
    _, assoc = live
    dimse = assoc.dimse
    assert isinstance(dimse, adapter.DIMSEServiceProvider) and dimse.message is None
    assert isinstance(dimse.msg_queue, queue.Queue)
    assert dimse.maximum_pdu_size == 16382 and dimse.dul is assoc.dul
    message = DIMSEMessage()
    assert isinstance(message.encoded_command_set, BytesIO) and isinstance(message.data_set, BytesIO)
    assert message._data_set_file is None and message._data_set_path is None
    assert C_STORE()._dataset_file is None and isinstance(C_STORE().is_valid_request, bool)
