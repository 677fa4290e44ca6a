"""DICOMweb in: a STOW-RS endpoint (``POST /studies``, ``POST /studies/{uid}``) beside the DIMSE
port, and ``POST /pull``, which fetches a study from a configured PACS with WADO-RS.

Every part goes through the same checks as a C-STORE dataset (walked to its last byte, UIDs
valid), is fsynced into the spool before the answer, and is tracked into its series the same way.
The answer is the standard Store Instances Response Module in DICOM JSON: ReferencedSOPSequence
for what was stored, FailedSOPSequence with a FailureReason for what was not; 200 when all were
stored, 202 when some were, 409 when none was.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

from pydicom.filereader import read_dataset

from .. import metrics
from ..multipart import decode_multipart
from .integrity import IncompleteDataset, check_dataset
from .server import read_instance_meta
from .wire import printable

log = logging.getLogger(__name__)

STUDIES = re.compile(r"^/studies(?:/([0-9.]{1,64}))?/?$")
STUDY_UID = re.compile(r"^[0-9.]{1,64}$")
CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE = 0xC000, 0xA700, 0x0110
STUDY_MISMATCH = 0xA900  # the instance is not of the study the request names


def split_part10(payload: bytes) -> tuple[str, int]:
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


class TooLarge(Exception):
    """A request body over ``scp.stow_max_bytes``."""


def _element(vr: str, *values) -> dict:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


class StowServer:
    """A threaded HTTP server for STOW-RS, storing through ``receiver``'s spool and tracker."""

    def __init__(self, receiver, host: str, port: int, max_bytes: int):
        self.receiver = receiver
        self.max_bytes = max_bytes
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="stow-rs", daemon=True)

    def start(self) -> StowServer:
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- one part ---------------------------------------------------------------------------
    def store_part(self, payload: bytes, study_uid: str | None, peer: str) -> tuple[int, str, str, str]:
        """Store one Part 10 instance; returns (status, SOP class, SOP instance, reason)."""
        receiver = self.receiver
        try:
            transfer_syntax, start = split_part10(payload)
            header = check_dataset(memoryview(payload)[start:], transfer_syntax,
                                   max_inflated=receiver.settings.scp.max_inflated_bytes)
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
            receiver.spool.store(instance.series_uid, instance.sop_instance_uid, [payload])
        except OSError as exc:
            return OUT_OF_RESOURCES, instance.sop_class_uid, instance.sop_instance_uid, exc.strerror or str(exc)
        receiver.tracker.observe(instance)
        metrics.INSTANCES.labels(metrics.ae_label(instance.calling_aet), "stow").inc()
        metrics.BYTES.labels(metrics.ae_label(instance.calling_aet), "stow").inc(len(payload))
        return 0, instance.sop_class_uid, instance.sop_instance_uid, ""

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
                status, _, sop_uid, reason = self.store_part(buffer.getvalue(), study_uid, peer)
                if status:
                    refused.append({"sop_instance_uid": sop_uid, "status": status, "reason": reason})
                else:
                    stored += 1
        log.info("pull of study %s from %s: %d series, %d instance(s) stored, %d refused",
                 study_uid, url, len(series), stored, len(refused))
        return {"study": study_uid, "series": series, "stored": stored, "refused": refused}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # requests are logged by what they did, below
                pass

            def _body(self) -> bytes | None:
                """The request body, by Content-Length or chunked; at most ``max_bytes``."""
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks: list[bytes] = []
                    total = 0
                    while True:
                        size = int(self.rfile.readline(100).split(b";")[0].strip() or b"x", 16)
                        if size == 0:
                            while self.rfile.readline(1000) not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        total += size
                        if total > server.max_bytes:
                            raise TooLarge()
                        chunk = self.rfile.read(size)
                        if len(chunk) < size:
                            raise ValueError("the body ended inside a chunk")
                        chunks.append(chunk)
                        self.rfile.readline(10)
                length = self.headers.get("Content-Length")
                if length is None or not length.strip().isdigit():
                    return None
                if int(length) > server.max_bytes:
                    raise TooLarge()
                body = self.rfile.read(int(length))
                if len(body) < int(length):
                    raise ValueError(f"{len(body)} of {length} bytes arrived")
                return body

            def _answer(self, status: int, body: dict | str) -> None:
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json" if isinstance(body, dict) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _pull(self, peer: str) -> None:
                """``POST /pull`` with ``{"study": uid, "series": uid}``: fetch and store as if sent."""
                if not server.receiver.settings.scp.pull_url:
                    return self._answer(404, "no scp.pull_url configured to pull from")
                try:
                    request = json.loads(self._body() or b"{}")
                    study, series = str(request["study"]), request.get("series")
                    if not (STUDY_UID.match(study) and (series is None or STUDY_UID.match(str(series)))):
                        raise ValueError("study and series must be UIDs")
                except (TooLarge, ValueError, KeyError, TypeError) as exc:
                    return self._answer(400, f'POST /pull takes {{"study": UID, "series": UID}}: {exc}')
                try:
                    result = server.pull(study, str(series) if series else None, peer)
                except Exception as exc:  # noqa: BLE001 - the PACS's answer or its absence, as the reason
                    log.warning("pull of study %s failed: %s", study, printable(str(exc)))
                    return self._answer(502, f"pull from {server.receiver.settings.scp.pull_url} failed: {exc}")
                self._answer(200, result)

            def do_POST(self):
                peer = f"{self.client_address[0]}:{self.client_address[1]}"
                if self.path.split("?")[0].rstrip("/") == "/pull":
                    return self._pull(peer)
                match = STUDIES.match(self.path.split("?")[0])
                if not match:
                    return self._answer(404, "STOW-RS takes POST /studies or /studies/{StudyInstanceUID}")
                content_type = self.headers.get("Content-Type", "")
                if not content_type.lower().startswith("multipart/related"):
                    return self._answer(415, "STOW-RS takes multipart/related; type=\"application/dicom\"")
                self.connection.settimeout(server.receiver.settings.scp.network_timeout)
                try:
                    body = self._body()
                except TooLarge:
                    log.warning("STOW-RS from %s refused: more than the %d bytes allowed", peer, server.max_bytes)
                    self.close_connection = True
                    return self._answer(413, f"at most {server.max_bytes} bytes per request")
                except (OSError, ValueError) as exc:
                    log.warning("STOW-RS from %s refused: %s", peer, printable(str(exc)))
                    self.close_connection = True
                    return self._answer(400, f"unreadable request body: {exc}")
                if body is None:
                    return self._answer(411, "Content-Length or chunked Transfer-Encoding is required")
                try:
                    parts = decode_multipart(body, content_type)
                except ValueError as exc:
                    log.warning("STOW-RS from %s refused: %s", peer, printable(str(exc)))
                    return self._answer(400, str(exc))
                stored, failed = [], []
                for number, (_headers, payload) in enumerate(parts, start=1):
                    status, sop_class, sop_uid, reason = server.store_part(payload, match.group(1), peer)
                    item = {"00081150": _element("UI", sop_class) if sop_class else _element("UI"),
                            "00081155": _element("UI", sop_uid) if sop_uid else _element("UI")}
                    if status == 0:
                        stored.append(item)
                    else:
                        item["00081197"] = _element("US", status)
                        failed.append(item)
                        log.warning("STOW-RS from %s: part %d not stored (0x%04X): %s", peer, number, status,
                                    printable(reason))
                log.info("STOW-RS from %s: %d instance(s) stored, %d refused", peer, len(stored), len(failed))
                answer = {}
                if stored:
                    answer["00081199"] = _element("SQ", *stored)
                if failed:
                    answer["00081198"] = _element("SQ", *failed)
                self._answer(200 if not failed else 202 if stored else 409, answer)

        return Handler
