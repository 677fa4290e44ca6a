"""Logging for every pacsworker process: plain text or one JSON object per line, each record with
the correlation id (a series UID or a job id) of the work it belongs to.

Log lines carry UIDs, AE titles, counts and reasons; callers never pass patient names, IDs or
birth dates, and pynetdicom's dataset dumps are kept out (its loggers stay at WARNING).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

_CORRELATION: contextvars.ContextVar[str] = contextvars.ContextVar("pacsworker_correlation", default="")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s%(correlation_tag)s: %(message)s"


@contextmanager
def correlated(correlation_id: str) -> Iterator[None]:
    """Every record logged inside (in this thread or task) carries ``correlation_id``."""
    token = _CORRELATION.set(correlation_id)
    try:
        yield
    finally:
        _CORRELATION.reset(token)


def set_correlation(correlation_id: str) -> None:
    """From here on, records of this thread (a task's) carry ``correlation_id``."""
    _CORRELATION.set(correlation_id)


class _Correlation(logging.Filter):
    """Sets the record's correlation id, and its plain-text tag unless the message already names it:
    a job id runs to a hundred characters and a line carries it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        correlation = getattr(record, "correlation", "") or _CORRELATION.get()
        record.correlation = correlation
        named = bool(correlation) and correlation in record.getMessage()
        record.correlation_tag = f" [{correlation}]" if correlation and not named else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, process, correlation, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "correlation": getattr(record, "correlation", ""),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, form: str) -> None:
    """The root handler of this process (stderr), in ``form`` ("plain" or "json")."""
    handler = logging.StreamHandler()
    handler.addFilter(_Correlation())
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # pynetdicom's own INFO/DEBUG lines can dump dataset contents; keep them out of the log
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # a decoder's failure is logged by pydicom with a traceback per plugin; the job's reason names it
    logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)
