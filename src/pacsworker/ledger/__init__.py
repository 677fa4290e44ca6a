"""The ledger: one database for the state of every role (series, studies, jobs and their inputs,
deliveries, receivers) and the history of events, behind named transitions and indexed queries.

A SQLite file under ``data_dir`` by default (:func:`default_url`); PostgreSQL
(``postgresql://...``) when roles run on several hosts::

    ledger = Ledger.open(default_url(settings.data_dir), actor="host/scp/PACSWORKER")
    ledger.record_instance(SeriesFacts(series_uid, study_uid, modality="CT"))

See docs/ledger.md.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from .database import LedgerError, default_url, filesystem_of, refuse_network_filesystem
from .deliveries import DeliveryTransitions
from .jobs import JobTransitions
from .queries import LedgerQueries
from .rows import (
    Claim,
    DeliveredInstance,
    Delivery,
    Event,
    Job,
    NewJob,
    Receiver,
    Series,
    SeriesFacts,
    Study,
)
from .schema import EventKind
from .series import SeriesTransitions


class Ledger(SeriesTransitions, JobTransitions, DeliveryTransitions, LedgerQueries):
    """The one database API: open it with :meth:`Ledger.open`; every state change is a method."""


_OPEN: dict[str, Ledger] = {}
_OPEN_LOCK = threading.Lock()


def ledger_url(settings: Any) -> str:
    """The ledger ``settings`` name: ``storage.database_url``, or the SQLite file under ``data_dir``."""
    return settings.storage.database_url or default_url(settings.data_dir)


def open_ledger(settings: Any, role: str) -> Ledger:
    """The ledger of ``settings``, opened once per process and URL (later calls share it; the first
    caller's role names the actor ``host/role`` in the history).

    Raises
    ------
    LedgerError
        For a database other than SQLite or PostgreSQL, or a SQLite file on a network file system.
    """
    return _cached(ledger_url(settings), role, settings.data_dir)


def ledger_at(data_dir: Any, role: str) -> Ledger:
    """The default (SQLite) ledger of ``data_dir``, shared like :func:`open_ledger`'s."""
    return _cached(default_url(data_dir), role, data_dir)


def _cached(url: str, role: str, data_dir: Any) -> Ledger:
    with _OPEN_LOCK:
        ledger = _OPEN.get(url)
        if ledger is None:
            ledger = _OPEN[url] = Ledger.open(url, actor=f"{socket.gethostname()}/{role}")
            from .importer import import_json_records

            import_json_records(ledger, data_dir)  # the first open over an earlier release's data_dir: its JSON records
        return ledger


def _forget_after_fork() -> None:
    """A forked child (a Celery pool process) opens its own connections: the parent's stay the parent's."""
    for ledger in _OPEN.values():
        ledger.engine.dispose(close=False)
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def close_ledgers() -> None:
    """Close every ledger this process opened (tests; a forked child must not share its parent's engine)."""
    with _OPEN_LOCK:
        for ledger in _OPEN.values():
            ledger.close()
        _OPEN.clear()


__all__ = [
    "Claim", "DeliveredInstance", "Delivery", "Event", "EventKind", "Job", "Ledger", "LedgerError", "NewJob",
    "Receiver", "Series", "SeriesFacts", "Study", "close_ledgers", "default_url", "filesystem_of", "ledger_url",
    "ledger_at", "open_ledger", "refuse_network_filesystem",
]
