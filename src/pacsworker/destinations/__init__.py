"""Where results go: DICOMweb STOW-RS or a folder. Each ``send`` raises on any failure."""

from __future__ import annotations

from pathlib import Path

from ..config import DicomwebDestination, FolderDestination
from .dicomweb import send_stow
from .folder import send_folder


class DeliveryError(Exception):
    """A destination did not confirm every instance."""


def send(destination: DicomwebDestination | FolderDestination, files: list[Path]) -> None:
    """Send result files to one destination; returns only when all of them were accepted."""
    try:
        if isinstance(destination, DicomwebDestination):
            send_stow(destination, files)
        else:
            send_folder(destination, files)
    except DeliveryError:
        raise
    except Exception as exc:  # noqa: BLE001 - network and disk errors are all delivery failures
        raise DeliveryError(f"{destination.name}: {type(exc).__name__}: {exc}") from exc
