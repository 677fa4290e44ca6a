"""The receiver's side of the DICOM upper layer, hardened against what a hostile peer can send.

pynetdicom's upper layer reads a PDU by trusting its length field and blocking until the body has
arrived. Here every read of a started PDU has a deadline, a PDU longer than the receiver allows is
answered with an A-ABORT before its body is read, AE titles that are not printable ASCII get an
A-ASSOCIATE-RJ, a connection that closes before association frees its slot at once, and a C-STORE
whose dataset never starts is completed empty (the Storage handler then refuses it).
"""

from __future__ import annotations

import functools
import logging
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from ..logs import printable
from .commands import StoreRefusal
from .datapath import FastStores
from .incoming import IDLE_WAIT, SpoolingDIMSE, dataset_started
from .pynetdicom_adapter import (
    C_STORE_RQ,
    P_DATA,
    AdaptedDUL,
    AdaptedRequestHandler,
    AssociationSocket,
    ThreadedAssociationServer,
    copy_context,
    install_dul,
    make_target,
    mark_aborted,
    register_server,
)

log = logging.getLogger("pacsworker.scp")

PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
P_DATA_TF = 0x04
# SO_RCVTIMEO takes a struct timeval here (Windows takes milliseconds): read plain sockets with it
KERNEL_TIMEOUTS = sys.platform.startswith("linux")
A_ASSOCIATE_RQ = 0x01
A_RELEASE_RQ = 0x05
Socket = socket.socket  # annotations inside GuardedDUL, whose ``socket`` attribute hides the module


@dataclass(frozen=True)
class WirePolicy:
    """Limits the receiver enforces on every connection.

    Parameters
    ----------
    network_timeout:
        Seconds a started PDU may take to arrive in full; also the idle timeout of an association.
    max_pdu_length:
        The maximum P-DATA-TF length the receiver advertises (bytes); a longer one aborts.
    max_associate_rq_length:
        The largest A-ASSOCIATE-RQ accepted (bytes).
    max_other_pdu_length:
        The largest release, abort or other PDU accepted (bytes).
    dataset_start_timeout:
        Seconds to wait for the first dataset fragment after a C-STORE command that announced one.
    incoming_dir:
        Where C-STORE datasets are written as they arrive (on the spool's filesystem); ``None``
        keeps them in memory as pynetdicom does.
    tls_handshake_timeout:
        Seconds a peer of the TLS listener has to finish its handshake.
    fast_path:
        Serve well-formed C-STOREs from their PDUs (:mod:`datapath`) and in the connection's thread;
        False leaves every request to pynetdicom's association thread.
    on_refused:
        Called with the association and the :class:`~.commands.StoreRefusal` of each C-STORE answered
        with a failure before it reached the Storage handler (the receiver counts it).
    """

    network_timeout: float = 60.0
    max_pdu_length: int = 262144
    max_associate_rq_length: int = 256 * 1024
    max_other_pdu_length: int = 64 * 1024
    dataset_start_timeout: float = 2.0
    incoming_dir: Path | None = None
    tls_handshake_timeout: float = 10.0
    fast_path: bool = True
    on_refused: Callable[[Any, StoreRefusal], None] | None = None

    def limit_for(self, pdu_type: int) -> int:
        if pdu_type == P_DATA_TF:
            return self.max_pdu_length
        if pdu_type == A_ASSOCIATE_RQ:
            return self.max_associate_rq_length
        return self.max_other_pdu_length


class PeerGone(Exception):
    """The peer closed the connection, went silent mid-PDU, or broke a limit."""


def _ae_is_valid(raw: bytes) -> bool:
    # PS3.5 AE VR: default repertoire, no control characters or backslash, not only spaces
    return all(0x20 <= b < 0x7F and b != 0x5C for b in raw) and bool(raw.strip(b" "))


# a PDV item's header takes 6 bytes of the peer's Maximum Length: 7 leaves room for one byte (PS3.8 9.3.5)
MIN_PEER_MAXIMUM_LENGTH = 7
UNREADABLE = -1


def peer_maximum_length(body: bytes) -> int | None:
    """The Maximum Length (PS3.8 D.1) an A-ASSOCIATE-RQ body announces; None when it has none,
    ``UNREADABLE`` when its items do not add up."""
    offset = 68
    while offset + 4 <= len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, offset)
        if item_type == 0x50:  # User Information: its sub-items
            sub, end = offset + 4, offset + 4 + length
            while sub + 4 <= end:
                sub_type, _, sub_length = struct.unpack_from(">BBH", body, sub)
                if sub_type == 0x51:
                    return struct.unpack_from(">L", body, sub + 4)[0] if sub_length == 4 and sub + 8 <= end else UNREADABLE
                sub += 4 + sub_length
            return None
        offset += 4 + length
    return None if offset == len(body) else UNREADABLE


def _abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, source, reason)


def _reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, diagnostic)


class _WakingQueue(queue.Queue):
    """A queue whose ``put`` also sets ``wake``."""

    def __init__(self, wake: threading.Event):
        super().__init__()
        self.wake = wake

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake.set()


class GuardedDUL(AdaptedDUL):
    """pynetdicom's DUL provider with bounded, timed PDU reads (acceptor side only)."""

    socket: AssociationSocket  # an acceptor's provider is made around its connection (install_dul)

    def __init__(self, assoc, policy: WirePolicy):
        super().__init__(assoc)
        self.policy = policy
        # set when the association's own loop has something to do: a complete DIMSE message, a
        # primitive for the user (release, abort), the end of this provider
        self.user_wake = threading.Event()
        self.to_user_queue = _WakingQueue(self.user_wake)
        self._store_waiting: tuple[int, float] | None = None
        # pynetdicom's loop sleeps 1 ms when idle; waiting on the socket and on this pair instead
        # wakes it the moment the peer sends or the association has something to send
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # C-STOREs served from their PDUs once the association is established (see datapath)
        self._fast: FastStores | None = None
        self._blocking_timeout: float | None = None  # the kernel timeouts of a plain socket, once in blocking mode
        # the peer asked to release (A-RELEASE-RQ read): known here before pynetdicom's released and
        # connection-closed events, which may come in either order
        self.release_requested = False

    # -- reading PDUs -------------------------------------------------------------------------
    def _recv_into(self, view: memoryview, deadline: float) -> None:
        """Fill ``view`` from the socket by ``deadline``.

        A plain socket reads in blocking mode with the kernel's receive timeout (SO_RCVTIMEO) and
        MSG_WAITALL: one system call per PDU instead of a poll and a read per batch of TCP segments. A
        TLS socket reads with Python's timeout. Either timeout is lowered only when it exceeds the time
        left by over 10 %: each change is a system call, and a stalled read still ends by its deadline
        (+10 % of what was left).
        """
        sock = self._connection()
        kernel = KERNEL_TIMEOUTS and not isinstance(sock, ssl.SSLSocket)
        if kernel and self._blocking_timeout is None:
            sock.settimeout(None)
            self._set_kernel_timeouts(sock, self.policy.network_timeout, send=True)
        got, count = 0, len(view)
        while got < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerGone(f"{got} of {count} bytes arrived within {self.policy.network_timeout:g} s")
            current = self._blocking_timeout if kernel else sock.gettimeout()
            if current is None or current * 0.9 > remaining:
                if kernel:
                    self._set_kernel_timeouts(sock, remaining)
                else:
                    sock.settimeout(remaining)
            try:
                chunk = sock.recv_into(view[got:], count - got, socket.MSG_WAITALL if kernel else 0)
            except (BlockingIOError, TimeoutError, InterruptedError):
                continue  # the timeout passed with nothing read: the deadline check reports it
            except OSError as exc:
                raise PeerGone(f"connection error ({exc.strerror or exc})") from None
            if not chunk:
                raise PeerGone("connection closed by the peer" + (f" after {got} of {count} bytes" if got else ""))
            got += chunk
        # back to the whole network timeout, which also bounds pynetdicom's blocking sends
        if kernel and self._blocking_timeout != self.policy.network_timeout:
            self._set_kernel_timeouts(sock, self.policy.network_timeout)
        elif not kernel and sock.gettimeout() != self.policy.network_timeout:
            sock.settimeout(self.policy.network_timeout)

    def _connection(self) -> Socket:
        sock = self.socket.socket
        assert sock is not None, "the acceptor's socket exists from the start"
        return sock

    def _set_kernel_timeouts(self, sock: Socket, seconds: float, send: bool = False) -> None:
        """SO_RCVTIMEO (and SO_SNDTIMEO, which bounds pynetdicom's blocking sends) of a blocking socket."""
        seconds = max(seconds, 0.001)
        whole = int(seconds)
        timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        if send:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._blocking_timeout = seconds

    def read_pdu(self) -> None:
        deadline = time.monotonic() + self.policy.network_timeout
        peer = self._peer()
        try:
            header = bytearray(6)
            self._recv_into(memoryview(header), deadline)
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type == A_RELEASE_RQ:
                self.release_requested = True
            name = PDU_NAMES.get(pdu_type)
            if name is None:
                self._drop(f"unknown PDU type 0x{pdu_type:02x} from {peer}", abort=True)
                return
            limit = self.policy.limit_for(pdu_type)
            if length > limit:
                self._drop(f"{name} from {peer} announces {length} bytes, more than the {limit} allowed; aborted",
                           abort=True)
                return
            pdu_bytes = bytearray(6 + length)  # the body is received in place, not copied
            pdu_bytes[:6] = header
            self._recv_into(memoryview(pdu_bytes)[6:], deadline)
        except PeerGone as exc:
            quiet = str(exc) == "connection closed by the peer"
            self._drop(f"connection from {peer}: {exc}", level=logging.INFO if quiet else logging.WARNING)
            return
        if pdu_type == A_ASSOCIATE_RQ and not self._associate_rq_is_sane(bytes(pdu_bytes[6:]), peer):
            return
        if pdu_type == P_DATA_TF and (fast := self._fast_path_open()) is not None:
            offset = self._fast_answering(fast.take, memoryview(pdu_bytes)[6:])
            if not self.connected():
                return
            if fast.violation is not None:
                self.abort_peer(fast.violation)
                return
            if offset is None:
                return
            if offset:  # the PDU's remaining items, as a PDU of their own
                rest = memoryview(pdu_bytes)[6 + offset:]
                pdu_bytes = bytearray(struct.pack(">BBL", P_DATA_TF, 0, len(rest))) + rest
        try:
            self.deliver_pdu(pdu_bytes)
        except Exception as exc:  # noqa: BLE001 - malformed PDU contents: abort, keep serving
            self._drop(f"undecodable {name} from {peer} ({type(exc).__name__}); aborted", abort=True)

    def _fast_answering(self, call, *args):
        """``call(*args)`` of :class:`FastStores`, which may send responses: a send that fails drops the connection."""
        try:
            return call(*args)
        except OSError as exc:
            self._drop(f"connection from {self._peer()}: connection error ({exc.strerror or exc})")
            return None

    def _fast_path_open(self) -> FastStores | None:
        """The :class:`FastStores` this P-DATA-TF PDU is for, if it is: the association is established, and
        either a C-STORE of the fast path is in progress or pynetdicom has nothing of its own under way."""
        if not self.policy.fast_path or self.policy.incoming_dir is None or self.state_machine.current_state != "Sta6":
            return None
        if self._fast is None:
            self._fast = FastStores(self.assoc, self.policy.incoming_dir, self._connection().sendall)
        if self._fast.pending is not None:
            return self._fast
        dimse = cast(SpoolingDIMSE, self.assoc.dimse)  # the fast path is on only with incoming_dir, hence it
        idle = (not dimse.receiving and self.event_queue.empty() and self.to_provider_queue.empty()
                and dimse.msg_queue.empty())
        return self._fast if idle else None

    def _associate_rq_is_sane(self, body: bytes, peer: str) -> bool:
        """Refuse AE titles pynetdicom cannot represent with an A-ASSOCIATE-RJ instead of a crash."""
        if len(body) < 68:
            self._drop(f"A-ASSOCIATE-RQ from {peer} is {len(body)} bytes, too short; aborted", abort=True)
            return False
        called, calling = body[4:20], body[20:36]
        for raw, what, diagnostic in ((calling, "calling", 0x03), (called, "called", 0x07)):
            if not _ae_is_valid(raw):
                self._send_raw(_reject_pdu(0x01, 0x01, diagnostic))
                self._drop(
                    f"association from {peer} rejected: {what} AE title '{printable(raw)}' is not printable ASCII"
                )
                return False
        maximum = peer_maximum_length(body)
        if maximum is UNREADABLE or (maximum is not None and (maximum == 0 or maximum >= MIN_PEER_MAXIMUM_LENGTH)):
            return True  # pynetdicom refuses an unreadable request itself
        why = ("announces no Maximum Length (PS3.8 D.1 requires one)" if maximum is None else
               f"announces a Maximum Length of {maximum} bytes, too small for any response "
               f"(at least {MIN_PEER_MAXIMUM_LENGTH}, or 0 for no limit)")
        self._send_raw(_reject_pdu(0x01, 0x01, 0x01))
        self._drop(f"association from {peer} (calling AE title '{printable(calling)}') rejected: it {why}")
        return False

    # -- ending a connection ------------------------------------------------------------------
    def _peer(self) -> str:
        info = self.assoc.requestor.address_info
        return f"{info.address}:{info.port}" if info else "(unknown)"

    def _send_raw(self, data: bytes) -> None:
        try:
            sock = self._connection()
            sock.settimeout(2)
            sock.sendall(data)
        except OSError:
            pass

    def _drop(self, message: str, abort: bool = False, level: int = logging.WARNING) -> None:
        log.log(level, message)
        if abort:
            self._send_raw(_abort_pdu())
        # the state machine turns Evt17 into an A-P-ABORT for an established association
        self.close_connection()
        self.event_queue.put("Evt17")

    def abort_peer(self, reason: str) -> None:
        """Abort the association at once because of what the peer sent."""
        self._drop(f"association from {self._peer()} aborted: {reason}", abort=True)

    def send_pdu(self, primitive) -> None:
        super().send_pdu(primitive)
        if threading.current_thread() is not self:  # a response sent from this thread is picked up next loop
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _wait_for_work(self, timeout: float = IDLE_WAIT) -> bool:
        """Wait until the peer sends, the association has something to send, or ``timeout``; True when
        the socket is readable."""
        if not self.event_queue.empty() or not self.to_provider_queue.empty():
            return False
        sock = self.socket.socket if self.connected() else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes select cannot see
            return True
        try:
            ready, _, _ = select.select([self._wake_r] if sock is None else [sock, self._wake_r], [], [], timeout)
        except (OSError, ValueError):  # the socket closed meanwhile: the connection is gone (Evt17)
            if sock is not None:
                self.connection_lost()
                self.event_queue.put("Evt17")
            time.sleep(0.001)
            return False
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass
        return sock is not None and sock in ready

    def run_reactor(self) -> None:
        try:
            self._reactor()
        finally:
            self.user_wake.set()
            self._wake_r.close()
            self._wake_w.close()
            self._release_unassociated_slot()  # also when the reactor ended on an exception
            if isinstance(self.assoc.dimse, SpoolingDIMSE):
                self.assoc.dimse.discard_unserved()
            if self._fast is not None:
                self._fast.discard()

    def _reactor(self) -> None:
        """pynetdicom's loop (see the adapter), waiting in ``_wait_for_work`` instead of sleeping: pynetdicom's
        yields the GIL before every pass that found no event."""
        self.reactor_loop(self.transport_event, self._upper_layer_failed)

    def _upper_layer_failed(self, exc: Exception) -> None:
        # pynetdicom's state machine raises on some malformed messages (a command without Command Field):
        # abort that association and keep serving
        log.error("association from %s aborted: a message its upper layer could not handle (%s)", self._peer(),
                  type(exc).__name__)
        log.debug("upper layer failure", exc_info=exc)
        self._send_raw(_abort_pdu())
        mark_aborted(self.assoc)

    def transport_event(self) -> bool:
        """Read a PDU if one arrives (True), after checking the dataset start of a C-STORE in progress."""
        self._check_dataset_start()
        if self.state_machine.current_state == "Sta13" or not self.connected():
            if self.pynetdicom_transport_event():  # pynetdicom's handling of a closing connection
                return True
            self._wait_for_work()
            return False
        # one select per PDU: it returns at once when the PDU is there, and the PDU is read straight away
        if self._wait_for_work():
            self.read_pdu()
            return True
        return False

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()
        self._release_unassociated_slot()

    def stop_dul(self) -> bool:
        if threading.current_thread() is self:
            # pynetdicom aborting from a request served in this thread (serve_now) waits for this thread to
            # end: it would wait for itself forever, one spinning thread and a socket per association
            self.stop_reactor()
            return True
        # pynetdicom asks again every 10 ms until the connection is closed (Sta1); waiting here in finer
        # steps ends the association, and frees its slot for the sender's next one, as soon as it is
        deadline = time.monotonic() + 0.01
        while self.state_machine.current_state != "Sta1" and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        if self.state_machine.current_state == "Sta1":
            self.stop_reactor()
            self._wake()  # pynetdicom's stop_dul then waits for this thread to see the flag
        return super().stop_dul()

    def _release_unassociated_slot(self) -> None:
        # The acceptor thread waits for an A-ASSOCIATE indication for acse_timeout seconds; a
        # connection that ended before sending one must not hold an association slot that long.
        if self.assoc.requestor.primitive is None and self.to_user_queue.empty():
            self.to_user_queue.put(None)  # type: ignore[arg-type]  # the acceptor takes None as "no request came"

    def _check_dataset_start(self) -> None:
        fasts = self._fast
        fast = fasts.pending if fasts is not None else None
        dimse = self.assoc.dimse
        refused = dimse.refused_awaiting_dataset if isinstance(dimse, SpoolingDIMSE) else None
        message = fast or dimse.message or refused
        if fasts is not None and fast is not None:
            started = fasts.dataset_started()
        elif isinstance(message, C_STORE_RQ):
            started = dataset_started(message)
        else:
            started = message is None or message is not refused
        if started:
            self._store_waiting = None
            return
        if not self.event_queue.empty() or self.socket.ready:  # something arrived: maybe the dataset
            return
        now = time.monotonic()
        if self._store_waiting is None or self._store_waiting[0] != id(message):
            self._store_waiting = (id(message), now)
            return
        if now - self._store_waiting[1] < self.policy.dataset_start_timeout:
            return
        self._store_waiting = None
        if fasts is not None and fast is not None:
            self._log_no_dataset(fast.AffectedSOPInstanceUID)
            self._fast_answering(fasts.serve)  # with nothing received: the Storage handler refuses it
        elif isinstance(message, C_STORE_RQ):
            self._log_no_dataset(message.command_set.AffectedSOPInstanceUID)
            self._end_dataset(cast(int, message.context_id))  # the Storage handler refuses it
        elif refused is not None:
            self._log_no_dataset(refused.refusal.instance)
            self._end_dataset(refused.context_id)  # answered with its refusal

    def _end_dataset(self, context_id: int) -> None:
        """Complete the dataset pynetdicom's path is waiting for with an empty last fragment."""
        empty_last_fragment = P_DATA()
        empty_last_fragment.presentation_data_value_list.append((context_id, b"\x02"))
        self.assoc.dimse.receive_primitive(empty_last_fragment)

    def _log_no_dataset(self, uid) -> None:
        log.warning(
            "C-STORE %s from %s announced a dataset but none arrived within %g s; answering with a failure",
            printable(str(uid)), printable(self.assoc.requestor.ae_title or ""), self.policy.dataset_start_timeout,
        )


class GuardedRequestHandler(AdaptedRequestHandler):
    """Builds each acceptor association around a :class:`GuardedDUL`."""

    def __init__(self, request, client_address, server, policy: WirePolicy):
        self.policy = policy
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            return  # the server closes the connection; nothing else was held up
        super().__init__(request, client_address, server)

    def _handshake(self, request: ssl.SSLSocket, address) -> bool:
        """The TLS handshake, in this connection's own thread and within its deadline."""
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        request.settimeout(self.policy.tls_handshake_timeout)
        try:
            request.do_handshake()
        except TimeoutError:
            log.warning("TLS handshake with %s not finished within %g s; closed", peer, self.policy.tls_handshake_timeout)
            return False
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, printable(str(getattr(exc, "reason", None) or exc)))
            return False
        certificate = request.getpeercert() or {}
        rdns: Any = certificate.get("subject", ())  # ((("commonName", "..."),), ...)
        subject = dict(item for rdn in rdns for item in rdn)
        log.info("TLS from %s: %s, client certificate %s", peer, request.version(),
                 printable(subject.get("commonName", "")) or "none")
        request.settimeout(self.policy.network_timeout)
        return True

    def adapt_association(self, assoc):
        install_dul(assoc, GuardedDUL(assoc, self.policy))
        if self.policy.incoming_dir is not None:
            assoc.dimse = SpoolingDIMSE(assoc, self.policy.incoming_dir, serve_in_dul=self.policy.fast_path,
                                        on_refused=self.policy.on_refused)
        return assoc


class _SupportedContexts(list):
    """A server's presentation contexts, copied for each association as pynetdicom does, but cheaply.

    pynetdicom deep-copies them per association: every storage class times every transfer syntax UID,
    tens of milliseconds holding the GIL while other associations wait. A context holds immutable
    values besides its list of transfer syntaxes, so a copy of each with its own list is the same.
    """

    def __deepcopy__(self, memo) -> list:
        return [copy_context(context) for context in self]


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded acceptor, but a TLS handshake happens in each connection's thread
    (pynetdicom's does it in the accept loop, where one silent peer would hold up every other)."""

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


def start_guarded_server(ae, address: tuple[str, int], policy: WirePolicy, evt_handlers,
                         ssl_context: ssl.SSLContext | None = None) -> ThreadedAssociationServer:
    """Start ``ae`` as a non-blocking acceptor whose associations use :class:`GuardedDUL`; with
    ``ssl_context``, one that speaks DICOM inside TLS."""
    ae.maximum_pdu_size = policy.max_pdu_length
    server = ae.make_server(
        address,
        evt_handlers=evt_handlers,
        server_class=GuardedServer,
        ssl_context=ssl_context,
        request_handler=functools.partial(GuardedRequestHandler, policy=policy),
    )
    server.contexts = _SupportedContexts(server.contexts)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{stamp}", daemon=True)
    thread.start()
    register_server(ae, server)
    return server



def tls_context(settings) -> ssl.SSLContext:
    """The server side of DICOM TLS from ``scp.tls``: TLS 1.2 or newer (BCP 195), the receiver's
    certificate and key, and client certificates verified against the CAs when they are given
    (required when asked).

    Raises
    ------
    OSError, ssl.SSLError
        If a certificate or key file cannot be read or does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.certificate), str(settings.private_key))
    if settings.ca_certificates is not None:
        context.load_verify_locations(cafile=str(settings.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
    return context
