"""DICOMweb STOW-RS with dicomweb-client; checks the per-instance outcome in the response."""

from __future__ import annotations

from pathlib import Path

import pydicom
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass

from ..config import DicomwebDestination


def _client(destination: DicomwebDestination) -> DICOMwebClient:
    if destination.auth is not None:
        session = create_session_from_user_pass(destination.auth.username, destination.auth.password)
    else:
        session = create_session()
    return DICOMwebClient(url=destination.url, session=session)


def send_stow(destination: DicomwebDestination, files: list[Path]) -> None:
    from . import DeliveryError

    datasets = [pydicom.dcmread(path) for path in files]
    response = _client(destination).store_instances(datasets=datasets)
    failed = response.get("FailedSOPSequence", []) if response is not None else []
    if failed:
        reasons = ", ".join(f"{item.ReferencedSOPInstanceUID} (0x{int(item.get('FailureReason', 0)):04X})" for item in failed)
        raise DeliveryError(f"{destination.name}: STOW-RS refused {len(failed)} instance(s): {reasons}")
