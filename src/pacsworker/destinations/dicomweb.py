"""DICOMweb STOW-RS with dicomweb-client: the Store Instances Response is read instance by instance.

ReferencedSOPSequence items are stored (a WarningReason is kept as their detail); FailedSOPSequence
items are classified by FailureReason; an instance the response does not name is tried again.
"Already stored" answers count as delivered: result UIDs are deterministic, so an instance with the
same SOP Instance UID is this very result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from ..config import DicomwebDestination
from .auth import connection_failure, http_failure, http_session
from .outcome import DeliveryError, InstanceResult, Verdict

# dicomweb-client's retry helper logs every failed request with a traceback; failures are reported here
logging.getLogger("retrying").setLevel(logging.ERROR)

ALREADY_STORED = {0x0111, 0xB00E}  # DIMSE "Duplicate SOP Instance"; 45070, Azure's "already exists"
RETRYABLE_REASONS = {0x0110}  # Processing failure (the server's own trouble)
FAILURE_MEANINGS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xC122: "transfer syntax not supported",
}
WARNING_MEANINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}


def failure_verdict(reason: int) -> tuple[Verdict, str]:
    """A STOW-RS FailureReason (PS3.18 Table 10.5.3-1) as a verdict and words."""
    if reason in ALREADY_STORED:
        return Verdict.STORED, f"already stored (0x{reason:04X})"
    if reason >> 8 == 0xA7:
        return Verdict.RETRYABLE, f"refused 0x{reason:04X}: out of resources"
    if reason >> 8 == 0xA9:
        meaning = "data set does not match SOP class"
    elif reason >> 12 == 0xC and reason not in FAILURE_MEANINGS:
        meaning = "cannot understand"
    else:
        meaning = FAILURE_MEANINGS.get(reason, "failure")
    verdict = Verdict.RETRYABLE if reason in RETRYABLE_REASONS else Verdict.PERMANENT
    return verdict, f"refused 0x{reason:04X}: {meaning}"


def read_store_response(response: pydicom.Dataset, sent: dict[str, Path]) -> list[InstanceResult]:
    """Per-instance results from a Store Instances Response, for the files sent (SOP Instance UID -> path)."""
    results: dict[str, InstanceResult] = {}
    referenced = response.get("ReferencedSOPSequence", [])
    failed = response.get("FailedSOPSequence", [])
    for item in referenced:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in sent:
            warning = item.get("WarningReason")
            detail = "stored"
            if warning is not None:
                detail = f"stored with warning 0x{int(warning):04X}: {WARNING_MEANINGS.get(int(warning), 'warning')}"
            results[uid] = InstanceResult(sent[uid], Verdict.STORED, detail)
    for item in failed:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in sent:
            verdict, detail = failure_verdict(int(item.get("FailureReason", 0x0110)))
            results[uid] = InstanceResult(sent[uid], verdict, detail)
    if len(response) == 0:
        # a 2xx answer without a body (some servers): the status says every instance was stored; an answer
        # with empty sequences (Orthanc 1.10 when its filter refused the instance) says nothing was
        return [InstanceResult(path, Verdict.STORED, "stored (no response body)") for path in sent.values()]
    return [results.get(uid) or InstanceResult(path, Verdict.RETRYABLE, "not named in the STOW-RS response")
            for uid, path in sent.items()]


def send_stow(destination: DicomwebDestination, files: list[Path]) -> list[InstanceResult]:
    """STOW-RS the files, ``instances_per_request`` at a time; per-instance results in file order.

    Raises
    ------
    DeliveryError
        When the first request fails as a whole (unreachable, or refused); later batches' failures
        are reported as results of their files.
    """
    what = f"STOW-RS to {destination.url}"
    session = http_session(destination.auth, destination.tls)
    # no chunked upload: a request body must be re-sendable after a token renewal; no retries inside
    client = DICOMwebClient(url=destination.url, session=session, timeout=destination.timeout_seconds,
                            chunk_size=1 << 62)
    client.set_http_retry_params(retry=False)
    size = destination.instances_per_request or len(files)
    results: list[InstanceResult] = []
    for start in range(0, len(files), size):
        batch = files[start:start + size]
        try:
            results += _store(client, batch, what)
        except DeliveryError as exc:
            if not results:
                raise
            results += exc.results(batch)  # what earlier batches stored stays stored
    return results


def _store(client: DICOMwebClient, files: list[Path], what: str) -> list[InstanceResult]:
    datasets = [pydicom.dcmread(path) for path in files]
    sent = {str(ds.SOPInstanceUID): path for ds, path in zip(datasets, files, strict=True)}
    try:
        response = client.store_instances(datasets=datasets)
    except requests.HTTPError as exc:
        answer = exc.response
        if answer is not None and answer.status_code == 409:  # none stored: each one's reason is in the body
            try:
                return read_store_response(pydicom.Dataset.from_json(answer.json()), sent)
            except ValueError:
                pass
        raise (http_failure(answer, what) if answer is not None else DeliveryError(f"{what}: {exc}")) from None
    except requests.RequestException as exc:
        raise connection_failure(exc, what) from None
    return read_store_response(response, sent)


def probe(destination: DicomwebDestination, timeout: float) -> str:
    """An authenticated request to the DICOMweb root (QIDO-RS, one study at most): "ok", or why
    delivery would fail now. 405 counts as ok: a STOW-only service need not answer searches."""
    what = f"DICOMweb {destination.url}"
    try:
        session = http_session(destination.auth, destination.tls)
        response = session.get(f"{destination.url.rstrip('/')}/studies", params={"limit": "1"},
                               timeout=min(timeout, destination.timeout_seconds),
                               headers={"Accept": "application/dicom+json"})
    except requests.RequestException as exc:
        return str(connection_failure(exc, what))
    except DeliveryError as exc:  # a secret or TLS file that cannot be read
        return str(exc)
    response.close()
    if response.ok or response.status_code == 405:
        return "ok"
    return str(http_failure(response, what))
