"""The DICOM receiver: Storage SCP for every storage class plus Verification, on pynetdicom."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from io import BytesIO

import pydicom
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from ..config import Settings
from ..records import DataLayout, SeriesRecord, is_valid_uid
from .spool import Spool
from .tracker import InstanceMeta, SeriesTracker

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
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality"]


def read_instance_meta(encoded: bytes, calling_aet: str) -> InstanceMeta:
    """Read the identifying header of an encoded instance; pixel data is never touched.

    Raises
    ------
    ValueError
        If the bytes are not a DICOM dataset or a required UID is missing or malformed.
    """
    try:
        ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on garbage
        raise ValueError(f"not a readable DICOM dataset ({type(exc).__name__}: {exc})") from None
    values = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = str(ds.get(keyword, "") or "")
        if not is_valid_uid(value):
            raise ValueError(f"{keyword} {value!r} is missing or not a valid UID")
        values[keyword] = value
    return InstanceMeta(
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        modality=str(ds.get("Modality", "") or ""),
        calling_aet=calling_aet,
    )


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
        self.tracker = SeriesTracker(self.layout, settings.scp.series_quiet_seconds)
        self.on_series_complete = on_series_complete
        self.periodic: list[Callable[[], None]] = []
        self._server = None
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
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    # -- event handlers (thin: store, record, answer) --------------------------------------
    def _handle_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        encoded = event.encoded_dataset()
        try:
            meta = read_instance_meta(encoded, calling)
        except ValueError as exc:
            log.warning("rejected C-STORE from %s (%s): %s", calling, event.request.AffectedSOPInstanceUID, exc)
            return STATUS_CANNOT_UNDERSTAND
        if meta.sop_instance_uid != event.request.AffectedSOPInstanceUID:
            log.warning(
                "rejected C-STORE from %s: SOP Instance UID %s differs from the command's %s",
                calling, meta.sop_instance_uid, event.request.AffectedSOPInstanceUID,
            )
            return STATUS_DATASET_MISMATCH
        try:
            self.spool.store(meta.series_uid, meta.sop_instance_uid, encoded)
        except OSError as exc:
            status = STATUS_OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 0xC001
            log.error("could not store %s from %s: %s", meta.sop_instance_uid, calling, exc)
            return status
        self.tracker.observe(meta)
        return 0x0000

    def _handle_echo(self, event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return 0x0000

    def _handle_assoc(self, event) -> None:
        log.info("association from %s (%s) accepted", event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _handle_rejected(self, event) -> None:
        log.warning(
            "association from %s to %s rejected (AE title not allowed)",
            event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title,
        )

    def _handle_abort(self, event) -> None:
        log.warning("association from %s aborted; instances already stored are kept", event.assoc.requestor.ae_title)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        pending = self.tracker.rebuild()
        if pending:
            log.info("%d series found pending in the spool after restart", pending)
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._handle_assoc),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ABORTED, self._handle_abort),
        ]
        cfg = self.settings.scp
        self._server = self.ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=handlers)
        self._loop = threading.Thread(target=self._run_loop, name="series-completion", daemon=True)
        self._loop.start()
        log.info("receiver %s listening on %s:%d", cfg.ae_title, cfg.host, cfg.port)

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
        if self._server is not None:
            self._server.shutdown()
        if self._loop is not None:
            self._loop.join(timeout=5)

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

