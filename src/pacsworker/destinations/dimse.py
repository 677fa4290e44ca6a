"""DICOM C-STORE (SCU) with pynetdicom: one association per delivery attempt, one C-STORE per instance.

Only the SOP classes and transfer syntaxes of the files being sent are proposed. Statuses
(PS3.4 B.2.3): Success and the warnings B000, B006 and B007 are delivered, and so is 0x0111
(duplicate: result UIDs are deterministic, so the instance there is this result); A7xx (out of
resources) may heal by waiting; every other failure is permanent.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from ..config import DimseDestination
from .auth import ssl_context
from .outcome import DeliveryError, InstanceResult, Verdict

DELIVERED_WARNINGS = {0xB000, 0xB006, 0xB007}
DUPLICATE = 0x0111
# A-ASSOCIATE-RJ (result source, diagnostic) that waiting cannot change, when rejected-permanent
PERMANENT_REJECTIONS = {(1, 2), (1, 3), (1, 7), (2, 2)}  # app context, calling AE, called AE, protocol version


def status_verdict(status: int) -> tuple[Verdict, str]:
    """A C-STORE response status as a verdict and words."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))[1]
    if status == 0x0000:
        return Verdict.STORED, "stored"
    if status in DELIVERED_WARNINGS:
        return Verdict.STORED, f"stored with warning 0x{status:04X}: {meaning}"
    if status == DUPLICATE:
        return Verdict.STORED, "already stored (0x0111)"
    detail = f"refused 0x{status:04X}: {meaning or 'failure'}"
    return (Verdict.RETRYABLE if status >> 8 == 0xA7 else Verdict.PERMANENT), detail


def send_cstore(destination: DimseDestination, files: list[Path]) -> list[InstanceResult]:
    """C-STORE the files over one association; per-instance results in file order.

    Raises
    ------
    DeliveryError
        When no association was made: refused, unreachable, or rejected (permanent when rejected
        for good, e.g. the called AE title is not recognised, or no SOP class was accepted).
    """
    where = f"C-STORE to {destination.ae_title}@{destination.host}:{destination.port}"
    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_seconds
    syntaxes: dict[str, set[str]] = defaultdict(set)
    for ds in datasets:
        syntaxes[str(ds.SOPClassUID)].add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, transfer_syntaxes in sorted(syntaxes.items()):
        ae.add_requested_context(sop_class, sorted(transfer_syntaxes))
    tls = (ssl_context(destination.tls), destination.host) if destination.tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
    if not assoc.is_established:
        raise _association_failure(assoc, where)
    results = []
    ended = f"{where}: the association ended before it was sent"
    silent = f"{where}: no response (timed out, or the connection was lost)"
    try:
        for path, ds in zip(files, datasets, strict=True):
            if not assoc.is_established:
                results.append(InstanceResult(path, Verdict.RETRYABLE, ended))
                continue
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # the association ended between two instances
                results.append(InstanceResult(path, Verdict.RETRYABLE, ended))
                continue
            except ValueError:  # pynetdicom: no accepted presentation context for it
                results.append(InstanceResult(path, Verdict.PERMANENT, (
                    f"{where}: the PACS accepted no presentation context for SOP class {ds.SOPClassUID} "
                    f"in transfer syntax {ds.file_meta.TransferSyntaxUID}")))
                continue
            if "Status" not in status:
                results.append(InstanceResult(path, Verdict.RETRYABLE, silent))
                continue
            verdict, detail = status_verdict(int(status.Status))
            results.append(InstanceResult(path, verdict, detail))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _association_failure(assoc, where: str) -> DeliveryError:
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        words = f"{where}: association rejected ({answer.result_str}, {answer.source_str}: {answer.reason_str})"
        permanent = answer.result == 0x01 and (answer.result_source, answer.diagnostic) in PERMANENT_REJECTIONS
        return DeliveryError(words, permanent=permanent)
    if answer is not None and answer.result == 0x00:  # accepted, but none of the contexts: pynetdicom aborted
        return DeliveryError(f"{where}: the PACS accepted none of the SOP classes offered", permanent=True)
    return DeliveryError(f"{where}: no association (connection refused, aborted or timed out)")


def echo(destination: DimseDestination, timeout: float) -> str:
    """A C-ECHO with the destination's AE titles (and TLS): "ok", or why delivery would fail now.

    A TCP connect is not enough: a PACS that does not know the calling AE title accepts the
    connection and then rejects the association, or refuses the Verification context.
    """
    where = f"C-ECHO to {destination.ae_title}@{destination.host}:{destination.port}"
    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(timeout, destination.timeout_seconds)
    ae.add_requested_context(Verification)
    tls = (ssl_context(destination.tls), destination.host) if destination.tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
    if not assoc.is_established:
        return str(_association_failure(assoc, where))
    try:
        status = assoc.send_c_echo()
    except ValueError:  # no accepted presentation context: the PACS would not verify this calling AE
        return f"{where}: the PACS refused Verification for calling AE title {destination.calling_ae_title}"
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status and assoc.is_aborted:  # Orthanc, for one: an unknown calling AE's echo is aborted
        return f"{where}: the PACS aborted the association at the C-ECHO (does it accept calling AE title " \
            f"{destination.calling_ae_title}?)"
    if "Status" not in status:
        return f"{where}: no response (timed out, or the connection was lost)"
    return "ok" if int(status.Status) == 0 else f"{where}: status 0x{int(status.Status):04X}"
