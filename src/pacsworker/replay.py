"""C-STORE sender for replaying studies: reads headers only, proposes what the files need."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS


@dataclass
class ReplayReport:
    """Per-file outcome of a replay: how many were sent, refused by the peer, or not DICOM."""

    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    not_dicom: list[Path] = field(default_factory=list)


def collect_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def replay(
    paths: list[Path], host: str, port: int, called_aet: str, calling_aet: str = "PACSWORKER-SCU",
    progress: Callable[[Path], None] | None = None,
) -> ReplayReport:
    """Send every DICOM file under ``paths`` over one association (each file's own transfer syntax).

    Raises
    ------
    ConnectionError
        If the association cannot be established; the message says why: the connection refused or
        timed out at host:port, the association rejected (with the peer's reason) or aborted.
    """
    report = ReplayReport()
    headers: list[tuple[Path, str, str]] = []
    for path in collect_files(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            headers.append((path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except Exception:  # noqa: BLE001 - anything unreadable is reported, not sent
            report.not_dicom.append(path)
            if progress:
                progress(path)
    ae = AE(ae_title=calling_aet)
    # one context per (SOP class, transfer syntax): each file goes out exactly as it is stored
    contexts = sorted({(sop_class, syntax) for _, sop_class, syntax in headers})
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} SOP class/transfer syntax pairs; at most 128 fit one association")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    if not headers:
        return report
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_aet} at {host}:{port} not established: "
                              f"{_not_established(assoc, host, port)}")
    try:
        for path, sop_class, syntax in headers:
            try:
                status = assoc.send_c_store(path)
            except ValueError:  # pynetdicom: no accepted context for this file's class and syntax
                report.failed.append((path, f"the peer accepted no presentation context for {UID(sop_class).name} "
                                            f"in {UID(syntax).name}"))
            except RuntimeError as exc:  # the association ended meanwhile
                report.failed.append((path, f"not sent: {exc}"))
            else:
                code = getattr(status, "Status", None)
                if code == 0x0000:
                    report.sent += 1
                else:
                    report.failed.append((path, _failure(status, code)))
            if progress:
                progress(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def _failure(status, code: int | None) -> str:
    """A refused C-STORE as the peer answered it: status code, its meaning, the peer's comment."""
    if code is None:
        return "no response (the association was aborted or timed out)"
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
    comment = str(status.get("ErrorComment", "") or "")
    return f"status 0x{code:04X} ({meaning}){f': {comment}' if comment else ''}"


def _not_established(assoc, host: str, port: int) -> str:
    """Why an association request failed: rejected (the peer's reason), aborted, or no connection."""
    if assoc.is_rejected:
        answer = assoc.acceptor.primitive
        if answer is None:
            return "rejected"
        lasting = answer.result_str.split()[-1].lower()  # "Rejected Permanent" / "Rejected Transient"
        return f"rejected ({lasting}) by the {answer.source_str.lower()}: {answer.reason_str}"
    try:  # pynetdicom reports a connection that failed as an abort: find out which
        with socket.create_connection((host, port), timeout=5):
            pass
    except ConnectionRefusedError:
        return f"connection refused at {host}:{port} (nothing listens there)"
    except TimeoutError:
        return f"no answer from {host}:{port} within 5 s"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    if assoc.is_aborted:
        return "the peer aborted the association request (is it a DICOM receiver, with TLS or not?)"
    return "the connection opened but no association answer came (check the port and whether it needs TLS)"
