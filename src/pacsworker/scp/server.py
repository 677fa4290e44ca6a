"""The DICOM receiver: Storage SCP for every storage class plus Verification, on pynetdicom."""

from __future__ import annotations

import errno
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import cast

from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import, from a table

from .. import metrics
from ..config import Settings
from ..ledger import open_ledger
from ..records import DataLayout, SeriesRecord, is_valid_uid
from .commands import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, STATUS_SOP_CLASS_NOT_SUPPORTED, StoreRefusal
from .incoming import PREAMBLE, IncomingDataset
from .integrity import Header, IncompleteDataset, check_dataset
from .pynetdicom_adapter import abort_sent, accepted_context, dataset_file
from .spool import Spool
from .tracker import InstanceMeta, SeriesTracker, plane_facts
from .wire import WirePolicy, printable, start_guarded_server, tls_context

log = logging.getLogger("pacsworker.scp")

ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# C-STORE failure statuses (PS3.4 B.2.3)
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0xC001

REJECT_REASONS = {
    (0x01, 0x01, 0x03): "calling AE title not in allowed_calling_aets",
    (0x01, 0x01, 0x07): "called AE title is not this receiver's",
    (0x02, 0x02, 0x01): "user identity not verified",
    (0x02, 0x03, 0x02): "too many associations",
}


# presentation context results (PS3.8 9.3.3.2) of a context not accepted
CONTEXT_NOT_ACCEPTED = {
    0x01: "rejected by the receiver",
    0x02: "rejected (no reason given)",
    0x03: "not offered: pacsworker only stores (Storage and Verification)",
    0x04: "not accepted in the transfer syntax(es) proposed",
}
SERVED_REQUESTS = ("C_STORE_RQ", "C_ECHO_RQ")
# the metrics' reason for a C-STORE refused by its command, by status
REFUSAL_KINDS = {STATUS_DATASET_MISMATCH: "uid-mismatch", STATUS_CANNOT_UNDERSTAND: "cannot-understand",
                 STATUS_SOP_CLASS_NOT_SUPPORTED: "sop-class-not-supported"}


@dataclass
class AssociationTally:
    """What one association did, for the line that says it ended."""

    calling: str
    address: str
    stored: int = 0
    refused: int = 0


def _service_name(uid: str) -> str:
    """A SOP class or transfer syntax by its name; an unknown one by its UID (as a peer sent it: printable only)."""
    name = UID(uid).name
    return name if name != uid else f"SOP class {printable(uid)[:64]}"


def _unreleased(assoc) -> str:
    """How an association ended that was not released, as its connection closed."""
    if abort_sent(assoc):
        return "aborted by pacsworker"
    try:
        by_peer = assoc.acse.is_aborted("a-abort")  # the peer's A-ABORT, still queued for pynetdicom
    except Exception:  # noqa: BLE001 - nothing to peek at any more
        by_peer = False
    return "aborted by the peer" if by_peer else "ended without release (connection closed)"


def read_instance_meta(header: Dataset | Header, calling_aet: str) -> InstanceMeta:
    """The identifying UIDs of a received instance, from its checked header.

    Raises
    ------
    ValueError
        If a required UID is missing or malformed (it would otherwise become part of a path).
    """
    values = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        try:
            value = str(header.get(keyword, "") or "")
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert
            value = "(undecodable)"
        if not is_valid_uid(value):
            raise ValueError(f"{keyword} '{printable(value)}' is missing or not a valid UID")
        values[keyword] = value
    try:
        modality = str(header.get("Modality", "") or "")
    except Exception:  # noqa: BLE001
        modality = ""
    return InstanceMeta(
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        modality=printable(modality)[:16],
        calling_aet=calling_aet,
        header=header,
        frames=_count(header, "NumberOfFrames") or 1,
        images_in_acquisition=_count(header, "ImagesInAcquisition"),
        **plane_facts(header),
    )


def _count(header: Dataset | Header, keyword: str) -> int | None:
    """A positive whole number from the header, or None (absent, empty, malformed)."""
    try:
        value = int(header.get(keyword) or 0)
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert
        return None
    return value if value > 0 else None


class Receiver:
    """Storage SCP + Verification; stores as received, tracks series, hands complete ones on.

    Parameters
    ----------
    settings:
        The validated settings (``scp`` and ``storage`` sections are used).
    on_series_complete:
        Called with each complete series' record; it must route the series (set its state,
        reason and jobs). If it raises, the series stays pending and is tried again.
    """

    def __init__(self, settings: Settings, on_series_complete: Callable[[SeriesRecord], None]):
        self.settings = settings
        self.layout = DataLayout(settings.data_dir).create()
        self.spool = Spool(self.layout)
        self.tracker = SeriesTracker(
            self.layout, settings.scp.series_quiet_seconds,
            settings.scp.evidence_quiet_seconds if settings.scp.complete_on_evidence else None,
            ledger=open_ledger(settings, "scp"),
        )
        self.on_series_complete = on_series_complete
        self.periodic: list[Callable[[], None]] = []
        self.on_stop: list[Callable[[], None]] = []  # what else stops with the receiver (the metrics port)
        self._servers: list = []  # the plain listener and the TLS one, as configured
        self._short_of_space = False
        self._tallies: dict[int, AssociationTally] = {}  # open associations (by id) -> what each did
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        cfg = self.settings.scp
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.require_called_aet = cfg.require_called_aet
        if cfg.allowed_calling_aets:
            ae.require_calling_aet = list(cfg.allowed_calling_aets)
        ae.network_timeout = cfg.network_timeout
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        ae.maximum_pdu_size = cfg.max_pdu_length
        for context in AllStoragePresentationContexts:
            # every storage context names its SOP class (pynetdicom casts the same way)
            ae.add_supported_context(cast(UID, context.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    @property
    def wire_policy(self) -> WirePolicy:
        cfg = self.settings.scp
        return WirePolicy(
            network_timeout=cfg.network_timeout,
            max_pdu_length=cfg.max_pdu_length,
            dataset_start_timeout=cfg.dataset_start_timeout,
            incoming_dir=self.layout.incoming,
            tls_handshake_timeout=cfg.tls.handshake_timeout if cfg.tls else 10.0,
            fast_path=cfg.fast_path,
            on_refused=self._count_refused,
        )

    # -- event handlers (thin: check, store, record, answer) -------------------------------
    def _handle_store(self, event) -> int:
        try:
            status = self._store(event)
        except Exception as exc:  # noqa: BLE001 - answer and keep serving; pynetdicom then deletes the file
            log.error(
                "C-STORE %s from %s failed: %s: %s", printable(str(event.request.AffectedSOPInstanceUID or "")),
                printable(event.assoc.requestor.ae_title or ""), type(exc).__name__, str(exc),
            )
            status = STATUS_PROCESSING_FAILURE
        tally = self._tallies.get(id(event.assoc))
        if tally is not None:  # one thread per association: its own tally needs no lock
            if status == 0x0000:
                tally.stored += 1
            else:
                tally.refused += 1
        return status

    def _count_refused(self, assoc, refusal: StoreRefusal) -> None:
        """A C-STORE refused before the Storage handler (its command): in the association's tally and the metrics."""
        tally = self._tallies.get(id(assoc))
        if tally is not None:
            tally.refused += 1
        reason = REFUSAL_KINDS.get(refusal.status, "cannot-understand")
        metrics.REFUSED.labels(metrics.ae_label(printable(assoc.requestor.ae_title or "")), reason).inc()

    def space_short(self) -> int | None:
        """Free bytes on data_dir when below the reserve, else None; says so once each way."""
        reserve = self.settings.storage.min_free_bytes
        if not reserve:
            return None
        free = shutil.disk_usage(self.layout.root).free
        short = free < reserve
        if short != self._short_of_space:
            self._short_of_space = short
            if short:
                log.error("data_dir has %d MiB free, below the reserve of %d MiB: instances are refused with 0xA700 "
                          "until space returns", free >> 20, reserve >> 20)
            else:
                log.warning("data_dir has %d MiB free again (reserve %d MiB): receiving", free >> 20, reserve >> 20)
        return free if short else None

    def _store(self, event) -> int:
        free = self.space_short()
        if free is not None:
            log.info("refused C-STORE %s from %s: %d MiB free on data_dir, below the reserve",
                     printable(str(event.request.AffectedSOPInstanceUID or "")),
                     printable(event.assoc.requestor.ae_title or ""), free >> 20)
            return STATUS_OUT_OF_RESOURCES
        incoming = dataset_file(event.request)
        if not isinstance(incoming, IncomingDataset):  # kept in memory by pynetdicom
            dataset = event.request.DataSet.getbuffer()
            try:
                return self._check_and_store(event, dataset, lambda meta: self._store_bytes(event, meta, dataset))
            finally:
                dataset.release()
        incoming.flush()
        if incoming.error is not None:  # the disk refused part of it while it arrived
            return self._refuse_unstored(event, incoming.error)
        with incoming.mapped() as dataset:
            return self._check_and_store(
                event, dataset, lambda meta: self.spool.adopt(meta.series_uid, meta.sop_instance_uid, incoming)
            )

    def _store_bytes(self, event, meta: InstanceMeta, dataset: memoryview) -> None:
        file_meta = BytesIO()
        # pydicom only calls fp.write(); its DicomIO annotation is narrower than what it needs
        write_file_meta_info(file_meta, event.file_meta, enforce_standard=True)  # type: ignore[arg-type]
        self.spool.store(meta.series_uid, meta.sop_instance_uid, [PREAMBLE, file_meta.getvalue(), dataset])

    def _check_and_store(self, event, dataset: memoryview, store: Callable[[InstanceMeta], object]) -> int:
        calling = printable(event.assoc.requestor.ae_title or "")
        announced = printable(str(event.request.AffectedSOPInstanceUID or ""))
        try:
            header = check_dataset(
                dataset, event.context.transfer_syntax, max_inflated=self.settings.scp.max_inflated_bytes
            )
            meta = read_instance_meta(header, calling)
            meta.association = id(event.assoc)
        except (IncompleteDataset, ValueError) as exc:
            # the reason as text: the exception's frames hold views of the received bytes
            log.warning("refused C-STORE %s from %s: %s", announced, calling, str(exc))
            metrics.REFUSED.labels(metrics.ae_label(calling), "cannot-understand").inc()
            return STATUS_CANNOT_UNDERSTAND
        if meta.sop_instance_uid != announced:
            log.warning(
                "refused C-STORE from %s: SOP Instance UID %s differs from the command's %s",
                calling, meta.sop_instance_uid, announced,
            )
            metrics.REFUSED.labels(metrics.ae_label(calling), "uid-mismatch").inc()
            return STATUS_DATASET_MISMATCH
        try:
            store(meta)
        except OSError as exc:
            return self._refuse_unstored(event, exc)
        self.tracker.observe(meta)
        label = metrics.ae_label(calling)
        metrics.INSTANCES.labels(label, "dimse").inc()
        metrics.BYTES.labels(label, "dimse").inc(len(dataset))
        return 0x0000

    def _refuse_unstored(self, event, exc: OSError) -> int:
        status = STATUS_OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else STATUS_PROCESSING_FAILURE
        log.error(
            "could not store %s from %s: %s", printable(str(event.request.AffectedSOPInstanceUID or "")),
            printable(event.assoc.requestor.ae_title or ""), exc.strerror or exc,
        )
        metrics.REFUSED.labels(metrics.ae_label(printable(event.assoc.requestor.ae_title or "")),
                               "out-of-resources" if status == STATUS_OUT_OF_RESOURCES else "not-stored").inc()
        return status

    def _handle_echo(self, event) -> int:
        log.info("C-ECHO from %s", printable(event.assoc.requestor.ae_title or ""))
        return 0x0000

    def _handle_requested(self, event) -> None:
        """The association's tally, from its request on: the connection's thread may serve (or refuse) its
        first C-STORE before the association's own thread runs the accepted handler."""
        assoc, request = event.assoc, event.assoc.requestor.primitive
        calling = printable(request.calling_ae_title or "") if request is not None else ""
        self._tallies[id(assoc)] = AssociationTally(calling, f"{assoc.requestor.address}:{assoc.requestor.port}")

    def _handle_assoc(self, event) -> None:
        assoc = event.assoc
        calling, address = printable(assoc.requestor.ae_title or ""), f"{assoc.requestor.address}:{assoc.requestor.port}"
        metrics.ASSOCIATIONS.labels(metrics.ae_label(calling), "accepted").inc()
        log.info("association from %s (%s) accepted", calling, address)
        self._log_contexts_not_accepted(assoc, calling, address)

    def _log_contexts_not_accepted(self, assoc, calling: str, address: str) -> None:
        """Name each proposed service not accepted, and why: a peer that asks for C-FIND or C-MOVE learns
        nothing else before it gives up."""
        proposed = {cx.context_id: cx for cx in (assoc.requestor.requested_contexts or [])}
        by_result: dict[int, list[str]] = {}
        for cx in assoc.rejected_contexts:
            name = _service_name(str(cx.abstract_syntax))
            if cx.result == 0x04:
                syntaxes = (proposed.get(cx.context_id) or cx).transfer_syntax
                name += f" ({', '.join(_service_name(str(ts)) for ts in syntaxes)})"
            if name not in by_result.setdefault(cx.result, []):
                by_result[cx.result].append(name)
        level = logging.INFO if assoc.accepted_contexts else logging.WARNING  # nothing it asked for is served
        for result, names in sorted(by_result.items()):
            why = CONTEXT_NOT_ACCEPTED.get(result, f"not accepted (result 0x{result:02X})")
            log.log(level, "association from %s (%s): peer proposed %s, %s", calling, address, "; ".join(names), why)

    def _handle_dimse(self, event) -> None:
        """A request for a service this receiver does not give, or on a context it did not accept: say so
        (pynetdicom then refuses it or aborts the association)."""
        message, assoc = event.message, event.assoc
        kind = type(message).__name__
        accepted = accepted_context(assoc, message.context_id) is not None
        if not kind.endswith("_RQ") or (kind in SERVED_REQUESTS and accepted):
            return
        try:
            sop_class = str(message.command_set.get("AffectedSOPClassUID", "")
                            or message.command_set.get("RequestedSOPClassUID", "") or "")
        except Exception:  # noqa: BLE001 - an undecodable command set: the service is named without its class
            sop_class = ""
        why = "not offered" if accepted else "on a presentation context that was not accepted"
        log.warning("%s request (%s) from %s (%s:%s) %s: pacsworker only stores (C-STORE, C-ECHO)",
                    kind[:-3].replace("_", "-"), _service_name(sop_class) if sop_class else "no SOP class",
                    printable(assoc.requestor.ae_title or ""), assoc.requestor.address, assoc.requestor.port, why)

    def _handle_rejected(self, event) -> None:
        assoc = event.assoc
        self._tallies.pop(id(assoc), None)  # nothing to tally: no line when its connection closes
        rj, rq = assoc.acceptor.primitive, assoc.requestor.primitive
        key = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else None
        unknown = f"result/source/diagnostic {key}"
        reason = REJECT_REASONS.get(key, unknown) if key is not None else unknown
        if key == (0x02, 0x03, 0x02):
            reason += f" (max_associations {self.settings.scp.max_associations})"
        called = printable(rq.called_ae_title) if rq is not None and rq.called_ae_title else "(none)"
        metrics.ASSOCIATIONS.labels(metrics.ae_label(printable(assoc.requestor.ae_title or "")), "rejected").inc()
        log.warning(
            "association from %s (%s) to %s rejected: %s",
            printable(assoc.requestor.ae_title or ""), assoc.requestor.address, called, reason,
        )

    def _handle_abort(self, event) -> None:
        metrics.ASSOCIATIONS.labels(metrics.ae_label(printable(event.assoc.requestor.ae_title or "")), "aborted").inc()
        self._log_end(event.assoc, "aborted by pacsworker" if abort_sent(event.assoc) else "aborted")

    def _handle_released(self, event) -> None:
        self._association_ended(event.assoc, released=True)

    def _handle_closed(self, event) -> None:
        # the connection may close before pynetdicom reports the release (the sender closes as soon as
        # it has the release response): a release the peer asked for counts here as well
        self._association_ended(event.assoc, released=getattr(event.assoc.dul, "release_requested", False))

    def _association_ended(self, assoc, released: bool) -> None:
        """Tell the tracker; the first of the two events forgets the association, the second finds nothing."""
        calling = printable(assoc.requestor.ae_title or "")
        trusted = released and calling in self.settings.scp.complete_on_release
        self.tracker.association_ended(id(assoc), calling if trusted else None)
        self._log_end(assoc, "released" if released else _unreleased(assoc))

    def _log_end(self, assoc, how: str) -> None:
        """One line per association when it ends (the first of its ending events): how, and what it stored."""
        tally = self._tallies.pop(id(assoc), None)
        if tally is None:
            return
        log.log(logging.INFO if how == "released" else logging.WARNING,
                "association from %s (%s) %s: %d instance(s) stored%s, %d refused", tally.calling, tally.address, how,
                tally.stored, " (kept)" if tally.stored and how != "released" else "", tally.refused)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.spool.remove_orphans()
        pending = self.tracker.rebuild()
        if pending:
            log.info("%d series found pending in the spool after restart", pending)
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_ACCEPTED, self._handle_assoc),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ABORTED, self._handle_abort),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_CONN_CLOSE, self._handle_closed),
            (evt.EVT_DIMSE_RECV, self._handle_dimse),
        ]
        cfg = self.settings.scp
        if cfg.plain:
            self._servers.append(start_guarded_server(self.ae, (cfg.host, cfg.port), self.wire_policy, handlers))
            log.info("receiver %s listening on %s:%d", cfg.ae_title, cfg.host, cfg.port)
        if cfg.tls is not None:
            context = tls_context(cfg.tls)
            self._servers.append(start_guarded_server(self.ae, (cfg.host, cfg.tls.port), self.wire_policy, handlers,
                                                      ssl_context=context))
            log.info("receiver %s listening with TLS on %s:%d (client certificates %s)", cfg.ae_title, cfg.host,
                     cfg.tls.port, _client_certificates(cfg.tls))
        if cfg.stow_port is not None:
            from .stow import StowServer

            stow = StowServer(self).start()
            self._servers.append(stow)
            log.info("STOW-RS listening on %s://%s:%d/studies%s", stow.http.scheme, cfg.host, cfg.stow_port,
                     f" (client certificates {_client_certificates(cfg.stow_tls)})" if cfg.stow_tls else "")
        self._loop = threading.Thread(target=self._run_loop, name="series-completion", daemon=True)
        self._loop.start()

    def _run_loop(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def tick(self) -> None:
        """One pass of the completion loop plus the periodic duties (recovery sweeps)."""
        self.tracker.complete_due(self.on_series_complete)
        for duty in self.periodic:
            try:
                duty()
            except Exception:  # noqa: BLE001 - a failed sweep must not stop the receiver
                log.exception("periodic duty failed; will run again")

    def stop(self) -> None:
        self._stop.set()
        for duty in self.on_stop:
            duty()
        for server in self._servers:
            server.shutdown()
        self._servers = []
        if self._loop is not None:
            self._loop.join(timeout=5)

    def parts(self) -> dict[str, str]:
        """Whether each of the receiver's threads still runs ("ok" or what stopped), for /healthz; none
        before :meth:`start` (the operator's port opens first)."""
        loop = self._loop
        if loop is None:
            return {}
        parts = {"receiver series completion": "ok" if loop.is_alive() else "thread stopped"}
        for server in self._servers:
            door = getattr(server, "http", None)  # the STOW-RS door's server
            if door is not None:
                name, alive = f"receiver STOW-RS {door.host}:{door.port}", door.serving()
            else:
                name, alive = f"receiver listener {server.server_address[0]}:{server.server_address[1]}", _serving(server)
            parts[name] = "ok" if alive else "stopped accepting connections"
        return parts

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()


def _serving(server) -> bool:
    """Whether a socketserver-based listener (pynetdicom's acceptor) is in serve_forever:
    socketserver keeps no public flag; its is-shut-down event is clear exactly while the loop runs."""
    return server.socket.fileno() != -1 and not server._BaseServer__is_shut_down.is_set()


def _client_certificates(tls) -> str:
    """What a listener's TLS settings ask of a client's certificate, for its log line."""
    return "required" if tls.require_client_certificate else \
        "verified when sent" if tls.ca_certificates else "not asked for"
