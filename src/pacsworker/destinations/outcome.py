"""What a destination says about each instance sent, and how a failure is classified."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class Verdict(str, enum.Enum):
    """One instance's outcome at one destination."""

    STORED = "stored"  # stored, stored with a warning, or already there
    RETRYABLE = "retryable"  # may heal by waiting: network, 5xx, 408, 429, out of resources
    PERMANENT = "permanent"  # will not heal by waiting: refused credentials, a bad request, an unknown AE


@dataclass(frozen=True)
class InstanceResult:
    """The destination's answer for one file; ``detail`` says what it said (a warning, a failure reason)."""

    path: Path
    verdict: Verdict
    detail: str = ""


class DeliveryError(Exception):
    """A destination took none of the instances (it was unreachable, or refused the request as a whole).

    Parameters
    ----------
    message
        What went wrong, fit for a log and for ``pacsworker status``: never a secret.
    permanent
        True when waiting cannot help (401, 403, 400, an association rejected for good).
    retry_after
        Seconds the destination asked to wait (HTTP Retry-After), if it said.
    """

    def __init__(self, message: str, permanent: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after

    def results(self, paths: list[Path]) -> list[InstanceResult]:
        """The same failure for every file of the request."""
        verdict = Verdict.PERMANENT if self.permanent else Verdict.RETRYABLE
        return [InstanceResult(path, verdict, str(self)) for path in paths]
