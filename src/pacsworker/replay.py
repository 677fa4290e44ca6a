"""C-STORE sender for replaying studies: reads headers only, proposes what the files need."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE


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
        If the association is rejected or cannot be established.
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
        raise ConnectionError(f"association with {called_aet} at {host}:{port} was rejected or failed")
    try:
        for path, _, _ in headers:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code == 0x0000:
                report.sent += 1
            else:
                report.failed.append((path, "no response" if code is None else f"status 0x{code:04X}"))
            if progress:
                progress(path)
    finally:
        assoc.release()
    return report
