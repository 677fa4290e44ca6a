"""The ledger: one database for the state of every role (series, studies, jobs and their inputs,
deliveries, receivers) and the history of events, behind named transitions and indexed queries.

A SQLite file under ``data_dir`` by default (:func:`default_url`); PostgreSQL
(``postgresql://...``) when roles run on several hosts::

    ledger = Ledger.open(default_url(settings.data_dir), actor="host/scp/PACSWORKER")
    ledger.record_instance(SeriesFacts(series_uid, study_uid, modality="CT"))

See docs/ledger.md.
"""

from __future__ import annotations

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


__all__ = [
    "Claim", "DeliveredInstance", "Delivery", "Event", "EventKind", "Job", "Ledger", "LedgerError", "NewJob",
    "Receiver", "Series", "SeriesFacts", "Study", "default_url", "filesystem_of", "refuse_network_filesystem",
]
