"""Where results go: DICOMweb STOW-RS, DICOM C-STORE or a folder, with an outcome per instance.

``send`` returns one :class:`InstanceResult` per file, or raises :class:`DeliveryError` when the
destination took none of them; both say whether a failure may heal by waiting (retryable) or not
(permanent). :mod:`.outbox` keeps the outcomes, retries and dead-letters.
"""

from __future__ import annotations

from pathlib import Path

from ..config import AnyDestination, DicomwebDestination, DimseDestination
from .outcome import DeliveryError, InstanceResult, Verdict

__all__ = ["DeliveryError", "InstanceResult", "Verdict", "send"]


def send(destination: AnyDestination, files: list[Path]) -> list[InstanceResult]:
    """Send result files to one destination; one result per file, in order.

    Raises
    ------
    DeliveryError
        When the destination took none of them (unreachable, or the request refused as a whole).
    """
    from .dicomweb import send_stow
    from .dimse import send_cstore
    from .folder import send_folder

    try:
        if isinstance(destination, DicomwebDestination):
            return send_stow(destination, files)
        if isinstance(destination, DimseDestination):
            return send_cstore(destination, files)
        return send_folder(destination, files)
    except DeliveryError:
        raise
    except Exception as exc:  # noqa: BLE001 - unforeseen errors (unreadable file, library bug) may heal on retry
        raise DeliveryError(f"{destination.name}: {type(exc).__name__}: {exc}") from exc
