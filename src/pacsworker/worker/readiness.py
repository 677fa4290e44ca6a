"""Which configured models a worker can run, found at its start by loading each one on its device.

A model loaded here stays warm in this process (:func:`~pacsworker.worker.runtime.get_model`'s
cache) for its first job. A model that does not load is named with the reason; its jobs fail at
once with that reason (each job tries to load it again, so a fixed model serves without a
restart). A remote model (Triton, Arterys) has nothing to load: its server is looked for, and
each job waits for it as configured.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import ModelSettings
from .adapters import ModelLoadError
from .runtime import get_model

REMOTE_KINDS = ("triton", "arterys")
REACH_TIMEOUT_SECONDS = 2.0
DEFAULT_PORTS = {"http": 80, "https": 443, "grpc": 8001}


@dataclass(frozen=True)
class ModelReadiness:
    """A model's state at start: usable or not, and why, in words."""

    name: str
    usable: bool
    detail: str
    remote: bool = False
    reachable: bool = True  # a remote model's server, now
    traceback: str = ""  # what the model's code raised while loading, when that says more than the reason

    def line(self) -> str:
        """One start-up line: ``model NAME usable: ...`` or ``model NAME NOT usable: ...``."""
        if self.usable:
            return f"model {self.name} usable: {self.detail}"
        line = f"model {self.name} NOT usable, its jobs fail at once with this reason until it loads: {self.detail}"
        return f"{line}\n{self.traceback}" if self.traceback else line


def warm_up(models: Sequence[ModelSettings]) -> list[ModelReadiness]:
    """Load every model now, in this process and on its device; look for each remote model's server."""
    found = []
    for settings in models:
        if settings.kind in REMOTE_KINDS:  # nothing to load here: its server is looked for
            reachable, detail = remote_reach(settings)
            found.append(ModelReadiness(settings.name, True, detail, remote=True, reachable=reachable))
            continue
        started = time.perf_counter()
        try:
            model = get_model(settings, say=False)
        except ModelLoadError as exc:
            found.append(ModelReadiness(settings.name, False, str(exc), traceback=getattr(exc, "traceback", "")))
            continue
        except Exception as exc:  # noqa: BLE001 - a start-up check names what went wrong, it never stops the worker
            found.append(ModelReadiness(settings.name, False, f"{type(exc).__name__}: {exc}"))
            continue
        found.append(ModelReadiness(settings.name, True, f"{settings.kind}, loaded on {model.device} in "
                                    f"{time.perf_counter() - started:.1f} s, kept warm for its jobs"))
    return found


def remote_reach(settings: ModelSettings) -> tuple[bool, str]:
    """Whether the server of a remote model takes a connection now (never a failure: jobs check again)."""
    url = str(getattr(settings, "url", "") or "")
    parts = urlsplit(url)
    wait = f"each job waits up to {getattr(settings, 'wait_seconds', 0):g} s for it"
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
        with socket.create_connection((parts.hostname or "", port), timeout=REACH_TIMEOUT_SECONDS):
            pass
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return False, f"{settings.kind} server at {url}, not reachable now ({why}); {wait}"
    return True, f"{settings.kind} server at {url}, reachable now; checked again by each job"
