"""The ledger's transactions: a write is one transaction (``BEGIN IMMEDIATE`` on SQLite, READ COMMITTED
on PostgreSQL) that changes rows by compare-and-set, keeps the state counters and appends its events."""

from __future__ import annotations

import functools
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, Table, insert, select, update
from sqlalchemy.exc import DBAPIError

from . import migrate
from .database import create_ledger_engine, db_now, normalise_url
from .schema import EventKind, counters, events

P = ParamSpec("P")
T = TypeVar("T")
RETRIES = 8
# PostgreSQL: deadlock, serialization failure; SQLite: the busy timeout ran out
RETRYABLE_SQLSTATES = {"40P01", "40001"}
REASON_LIMIT = 2000  # an event's reason: one line of why, never a document


def retried(method: Callable[P, T]) -> Callable[P, T]:
    """Run a transition again when the database chose it as a deadlock victim or stayed busy."""

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(RETRIES):
            try:
                return method(*args, **kwargs)
            except DBAPIError as exc:
                if attempt == RETRIES - 1 or not _retryable(exc):
                    raise
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    return run


def _retryable(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate in RETRYABLE_SQLSTATES or "database is locked" in str(exc.orig)



def dialect_insert(conn: Connection, table: Table):
    """An INSERT with the connection's dialect's ``on_conflict_do_*`` (SQLite and PostgreSQL spell them alike);
    the dialect module is imported when first used, so a command on SQLite never imports PostgreSQL's."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)

class Tx:
    """One write transaction: its connection, the counter changes to apply at its end, its events."""

    def __init__(self, connection: Connection, actor: str):
        self.conn = connection
        self.actor = actor
        self.deltas: Counter[tuple[str, str, str]] = Counter()

    def locked(self, table: Table, **key: Any):
        """The row with this primary key, locked until the end of the transaction (None: absent)."""
        query = select(table).where(*(table.c[name] == value for name, value in key.items()))
        return self.conn.execute(query.with_for_update()).first()

    def swap(self, table: Table, key: dict[str, Any], seen_state: str, **values: Any) -> bool:
        """Compare-and-set: change the row only while it is still in ``seen_state``; True if it was."""
        query = (update(table).where(*(table.c[name] == value for name, value in key.items()))
                 .where(table.c.state == seen_state).values(**values))
        return self.conn.execute(query).rowcount == 1

    def move(self, entity: str, label: str, old: str | None, new: str | None) -> None:
        """Count one ``entity`` (series, job, delivery) out of state ``old`` and into ``new``."""
        if old == new:
            return
        if old:
            self.deltas[(entity, label, old)] -= 1
        if new:
            self.deltas[(entity, label, new)] += 1

    def event(self, kind: EventKind, *, reason: str = "", **where: Any) -> None:
        values = {"actor": self.actor, **where}
        self.conn.execute(insert(events).values(at=db_now(), kind=kind.value, reason=reason[:REASON_LIMIT], **values))

    def flush(self) -> None:
        """Apply the counter changes, in key order (so that concurrent transactions never deadlock on them)."""
        for (entity, label, state), n in sorted(self.deltas.items()):
            if not n:
                continue
            upsert = dialect_insert(self.conn, counters).values(entity=entity, label=label, state=state, n=n)
            self.conn.execute(upsert.on_conflict_do_update(
                index_elements=["entity", "label", "state"], set_={"n": counters.c.n + n}))
        self.deltas.clear()


class LedgerCore:
    """An open ledger: an engine, and the transactions every transition and query runs in."""

    def __init__(self, engine: Engine, actor: str = ""):
        self.engine = engine
        self.actor = actor or socket.gethostname()

    @classmethod
    def open(cls, url: str, actor: str = ""):
        """Open the ledger at ``url`` (see :func:`~.database.default_url`) and bring its tables to the
        newest revision.

        ``actor``: who this process is in the history (``host/role/AE``); the host name by default.

        Raises
        ------
        LedgerError
            For a database other than SQLite or PostgreSQL, or a SQLite file on a network file system.
        """
        engine = create_ledger_engine(normalise_url(url))
        ledger = cls(engine, actor)
        with ledger._write() as tx:
            migrate.upgrade(tx.conn)
        return ledger

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Tx]:
        with self.engine.connect().execution_options(ledger_write=True) as connection, connection.begin():
            tx = Tx(connection, self.actor)
            yield tx
            tx.flush()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as connection, connection.begin():
            yield connection

    def now(self) -> float:
        """The database's clock (seconds since the epoch): the one clock heartbeats are compared with."""
        with self._read() as conn:
            return float(conn.execute(select(db_now())).scalar_one())
