"""DICOMweb in: a STOW-RS endpoint (``POST /studies``, ``POST /studies/{uid}``) beside the DIMSE
port, and ``POST /pull``, which fetches a study from a configured PACS with WADO-RS.

The body is parsed as it arrives: each part is written straight into a file under ``incoming/`` and
checked when its closing delimiter arrives, with the same checks as a C-STORE dataset (walked to
its last byte, UIDs valid); it is fsynced into the spool before the answer and tracked into its
series the same way. Memory is bounded by a chunk of the body, whatever its size. A body that is cut
off or stops being multipart leaves nothing of the part it was in; the parts before it stay stored.
The answer is the standard Store Instances Response Module in DICOM JSON: ReferencedSOPSequence
for what was stored, FailedSOPSequence with a FailureReason for what was not; 200 when all were
stored, 202 when some were, 409 when none was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
from collections.abc import Callable
from io import BytesIO

from pydicom.filereader import read_dataset

from .. import metrics
from ..http_server import HttpServer, Receive, Scope, Send, answer, authorized, peer_of
from ..multipart import MultipartReader, PartEnd, PartStart, boundary_of
from .incoming import IncomingDataset
from .integrity import IncompleteDataset, check_dataset
from .server import read_instance_meta
from .tracker import InstanceMeta
from .wire import printable

log = logging.getLogger(__name__)

STUDIES = re.compile(r"^/studies(?:/([0-9.]{1,64}))?/?$")
STUDY_UID = re.compile(r"^[0-9.]{1,64}$")
CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE = 0xC000, 0xA700, 0x0110
STUDY_MISMATCH = 0xA900  # the instance is not of the study the request names
MAX_PULL_REQUEST = 64 * 1024  # {"study": UID, "series": UID}
DICOM_JSON = "application/dicom+json"


def split_part10(payload: bytes | memoryview) -> tuple[str, int]:
    """A Part 10 instance's transfer syntax and where its dataset starts.

    Raises
    ------
    ValueError
        If there is no preamble and DICM prefix, or no File Meta Information group.
    """
    if len(payload) < 144 or payload[128:132] != b"DICM":
        raise ValueError("no DICM prefix after a 128-byte preamble")
    group, element, vr, _, length = struct.unpack("<HH2sHL", payload[132:144])
    if (group, element, vr) != (2, 0, b"UL") or length > len(payload) - 144:
        raise ValueError("no File Meta Information Group Length")
    meta = read_dataset(BytesIO(payload[144:144 + length]), is_implicit_VR=False, is_little_endian=True)
    transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not transfer_syntax:
        raise ValueError("no Transfer Syntax UID in the File Meta Information")
    return transfer_syntax, 144 + length


def _element(vr: str, *values) -> dict:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


Outcome = tuple[int, str, str, str]  # status, SOP Class UID, SOP Instance UID, reason


class StowServer:
    """STOW-RS in and ``POST /pull`` on ``scp.stow_port``: an ASGI application on the HTTP server layer,
    storing through ``receiver``'s spool and tracker."""

    def __init__(self, receiver):
        cfg = receiver.settings.scp
        self.receiver = receiver
        self.max_bytes = cfg.stow_max_bytes
        self.http = HttpServer(self, cfg.host, cfg.stow_port, cfg.stow_limits, cfg.stow_tls, "stow-rs")

    def start(self) -> StowServer:
        self.http.start()
        return self

    def shutdown(self) -> None:
        self.http.shutdown()

    # -- one part ---------------------------------------------------------------------------
    def check_and_store(self, part10: memoryview, study_uid: str | None, store: Callable[[InstanceMeta], object]) -> Outcome:
        """Check one Part 10 instance and hand it to ``store`` when it is whole and of ``study_uid``."""
        receiver = self.receiver
        try:
            transfer_syntax, start = split_part10(part10)
            header = check_dataset(part10[start:], transfer_syntax, max_inflated=receiver.settings.scp.max_inflated_bytes)
            instance = read_instance_meta(header, "STOW-RS")  # the "calling AE" routing rules see
        except (IncompleteDataset, ValueError, EOFError, AttributeError, KeyError) as exc:
            return CANNOT_UNDERSTAND, "", "", f"not a whole DICOM Part 10 instance: {exc}"
        except Exception as exc:  # noqa: BLE001 - pydicom's own errors on hostile bytes
            return CANNOT_UNDERSTAND, "", "", f"unreadable: {type(exc).__name__}"
        if study_uid and instance.study_uid != study_uid:
            return STUDY_MISMATCH, instance.sop_class_uid, instance.sop_instance_uid, \
                f"of study {instance.study_uid}, not {study_uid}"
        if receiver.space_short() is not None:
            reason = "data_dir below its free-space reserve"
            return OUT_OF_RESOURCES, instance.sop_class_uid, instance.sop_instance_uid, reason
        try:
            store(instance)
        except OSError as exc:
            return OUT_OF_RESOURCES, instance.sop_class_uid, instance.sop_instance_uid, exc.strerror or str(exc)
        receiver.tracker.observe(instance)
        metrics.INSTANCES.labels(metrics.ae_label(instance.calling_aet), "stow").inc()
        metrics.BYTES.labels(metrics.ae_label(instance.calling_aet), "stow").inc(len(part10))
        return 0, instance.sop_class_uid, instance.sop_instance_uid, ""

    def store_part(self, payload: bytes, study_uid: str | None) -> Outcome:
        """Store one Part 10 instance held in memory (a pulled one)."""
        spool = self.receiver.spool
        return self.check_and_store(memoryview(payload), study_uid,
                                    lambda meta: spool.store(meta.series_uid, meta.sop_instance_uid, [payload]))

    def store_incoming(self, incoming: IncomingDataset, study_uid: str | None) -> Outcome:
        """Check a part received into ``incoming/`` and move it into the spool; the file is gone either way."""
        spool = self.receiver.spool
        try:
            if incoming.error is not None:
                return OUT_OF_RESOURCES, "", "", f"not written: {incoming.error.strerror or incoming.error}"
            if not incoming.received:
                return CANNOT_UNDERSTAND, "", "", "not a whole DICOM Part 10 instance: the part is empty"
            with incoming.mapped() as part10:
                return self.check_and_store(
                    part10, study_uid, lambda meta: spool.adopt(meta.series_uid, meta.sop_instance_uid, incoming))
        finally:
            incoming.discard()  # after adopt(): only closes

    def pull(self, study_uid: str, series_uid: str | None, peer: str) -> dict:
        """Fetch a study (or one series) from ``scp.pull_url`` with WADO-RS, series by series, and
        store every instance as if it had been sent; returns counts and the refused instances."""
        from dicomweb_client.api import DICOMwebClient
        from pydicom.filewriter import dcmwrite

        from ..destinations.auth import http_session

        scp = self.receiver.settings.scp
        url = scp.pull_url
        client = DICOMwebClient(url=url, session=http_session(scp.pull_auth, scp.pull_tls))
        if series_uid:
            series = [series_uid]
        else:
            found = client.search_for_series(study_instance_uid=study_uid) or []
            series = [item["0020000E"]["Value"][0] for item in found if "0020000E" in item]
        stored, refused = 0, []
        for uid in series:
            for ds in client.retrieve_series(study_uid, uid):
                buffer = BytesIO()
                dcmwrite(buffer, ds, enforce_file_format=True)
                status, _, sop_uid, reason = self.store_part(buffer.getvalue(), study_uid)
                if status:
                    refused.append({"sop_instance_uid": sop_uid, "status": status, "reason": reason})
                else:
                    stored += 1
        log.info("pull of study %s from %s (asked by %s): %d series, %d instance(s) stored, %d refused",
                 study_uid, url, peer, len(series), stored, len(refused))
        return {"study": study_uid, "series": series, "stored": stored, "refused": refused}

    # -- the ASGI application ------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer, path = peer_of(scope), scope["path"]
        pulling = path.rstrip("/") == "/pull"
        match = STUDIES.match(path)
        if not pulling and not match:
            return await answer(send, 404, b"STOW-RS takes POST /studies or /studies/{StudyInstanceUID}; "
                                           b"a pull POST /pull")
        if scope["method"] != "POST":
            return await answer(send, 405, b"POST only", headers=[(b"allow", b"POST")])
        if not await authorized(self.receiver.settings.scp.stow_auth, scope, send):
            return None
        if pulling:
            return await self._pull(scope, receive, send, peer)
        return await self._studies(scope, receive, send, match.group(1) if match else None, peer)

    async def _pull(self, scope: Scope, receive: Receive, send: Send, peer: str) -> None:
        """``POST /pull`` with ``{"study": uid, "series": uid}``: fetch and store as if sent."""
        url = self.receiver.settings.scp.pull_url
        if not url:
            return await answer(send, 404, b"no scp.pull_url configured to pull from")
        try:
            request = json.loads(await _small_body(receive, MAX_PULL_REQUEST) or b"{}")
            study, series = str(request["study"]), request.get("series")
            if not (STUDY_UID.match(study) and (series is None or STUDY_UID.match(str(series)))):
                raise ValueError("study and series must be UIDs")
        except (ValueError, KeyError, TypeError) as exc:
            message = f'POST /pull takes {{"study": UID, "series": UID}}: {exc}'
            return await answer(send, 400, message.encode())
        try:
            result = await asyncio.to_thread(self.pull, study, str(series) if series else None, peer)
        except Exception as exc:  # noqa: BLE001 - the PACS's answer or its absence, as the reason
            log.warning("pull of study %s failed: %s", study, printable(str(exc)))
            return await answer(send, 502, f"pull from {url} failed: {exc}".encode())
        await answer(send, 200, json.dumps(result).encode(), DICOM_JSON)

    async def _studies(self, scope: Scope, receive: Receive, send: Send, study_uid: str | None, peer: str) -> None:
        """STOW-RS: the body's parts stored as they complete; the Store Instances Response."""
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if not content_type.lower().startswith("multipart/related"):
            return await answer(send, 415, b'STOW-RS takes multipart/related; type="application/dicom"')
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            log.warning("STOW-RS from %s refused: more than the %d bytes allowed (%s declared)", peer,
                        self.max_bytes, declared.decode())
            return await answer(send, 413, f"at most {self.max_bytes} bytes per request".encode())
        try:
            reader = MultipartReader(boundary_of(content_type))
        except ValueError as exc:
            return await answer(send, 400, str(exc).encode())
        intake = _Intake(self, study_uid, peer)
        try:
            refusal = await intake.read(receive, reader)
        except PeerGone:  # no one to answer
            return None
        finally:
            intake.discard_open_part()
        if refusal is not None:
            status, reason = refusal
            log.warning("STOW-RS from %s refused: %s (%d instance(s) before it stored)", peer, printable(reason),
                        len(intake.stored))
            return await answer(send, status, f"{reason}; {len(intake.stored)} instance(s) before it were stored"
                                .encode())
        log.info("STOW-RS from %s: %d instance(s) stored, %d refused", peer, len(intake.stored), len(intake.failed))
        document = {}
        if intake.stored:
            document["00081199"] = _element("SQ", *intake.stored)
        if intake.failed:
            document["00081198"] = _element("SQ", *intake.failed)
        status = 200 if not intake.failed else 202 if intake.stored else 409
        await answer(send, status, json.dumps(document).encode(), DICOM_JSON)


class PeerGone(Exception):
    """The peer closed the connection before the end of the request body."""


class _Intake:
    """One STOW-RS body being received: the part being written, and the outcomes of those complete."""

    def __init__(self, server: StowServer, study_uid: str | None, peer: str):
        self.server, self.study_uid, self.peer = server, study_uid, peer
        self.part: IncomingDataset | None = None
        self.number = 0
        self.stored: list[dict] = []
        self.failed: list[dict] = []

    async def read(self, receive: Receive, reader: MultipartReader) -> tuple[int, str] | None:
        """Read the body to its end, storing its parts; (status, reason) when it is refused.

        Raises
        ------
        PeerGone
            If the peer closed the connection before the body's end.
        """
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.warning("STOW-RS from %s cut off after %d bytes, in part %d; %d instance(s) before it stored",
                            self.peer, received, self.number, len(self.stored))
                raise PeerGone()
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.server.max_bytes:
                return 413, f"more than the {self.server.max_bytes} bytes allowed per request"
            try:
                for event in reader.feed(chunk):
                    await self.take(event)
                if not message.get("more_body", False):
                    reader.finish()
                    break
            except ValueError as exc:
                return 400, f"malformed multipart body: {exc}"
        if reader.parts == 0:
            return 400, "the body holds no multipart part"
        return None

    async def take(self, event: PartStart | bytes | PartEnd) -> None:
        if isinstance(event, PartStart):
            self.number += 1
            self.part = IncomingDataset(self.server.receiver.layout.incoming, None)
        elif isinstance(event, PartEnd):
            part, self.part = self.part, None
            if part is not None:
                self.record(await asyncio.to_thread(self.server.store_incoming, part, self.study_uid))
        elif self.part is not None:
            self.part.write(event)

    def record(self, outcome: Outcome) -> None:
        status, sop_class, sop_uid, reason = outcome
        item = {"00081150": _element("UI", sop_class) if sop_class else _element("UI"),
                "00081155": _element("UI", sop_uid) if sop_uid else _element("UI")}
        if status == 0:
            self.stored.append(item)
            return
        item["00081197"] = _element("US", status)
        self.failed.append(item)
        log.warning("STOW-RS from %s: part %d not stored (0x%04X): %s", self.peer, self.number, status,
                    printable(reason))

    def discard_open_part(self) -> None:
        """The body ended (cut off, refused, stalled) inside a part: nothing of it stays in ``incoming/``."""
        if self.part is not None:
            self.part.discard()
            self.part = None


async def _small_body(receive: Receive, limit: int) -> bytes:
    """A request body of at most ``limit`` bytes.

    Raises
    ------
    ValueError
        If it is longer, or the peer went away.
    """
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ValueError("the peer went away")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise ValueError(f"more than {limit} bytes")
        if not message.get("more_body", False):
            return b"".join(chunks)
