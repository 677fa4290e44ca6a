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


def printable(raw: bytes | str) -> str:
    """A value from the wire (AE title, UID) as it may appear in a log line: control and non-ASCII
    bytes escaped, so that a peer cannot write raw bytes into the log."""
    if isinstance(raw, str):
        if raw.isascii() and raw.isprintable() and "\\" not in raw:  # the usual case, as it is
            return raw.strip()
        raw = raw.encode("latin-1", "backslashreplace")
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw).strip()


# libraries that put values from the wire (UIDs, AE titles) into their messages as they came
WIRE_LIBRARIES = ("pynetdicom", "pydicom")


class _WireLibraryRecords(logging.Filter):
    """Escapes what the DICOM libraries log: a newline in a UID they quote would write a forged line
    into the log. An exception they log is reduced to one escaped line (its text can quote the same
    values); pacsworker escapes what it logs itself, and other libraries' tracebacks stay whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.partition(".")[0] not in WIRE_LIBRARIES:
            return True
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message += f" ({type(error).__name__}: {error})"
        record.msg, record.args = printable(message), None
        record.exc_info = record.exc_text = None
        return True


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
    handler.addFilter(_WireLibraryRecords())
    handler.addFilter(_Correlation())
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # pynetdicom's own INFO/DEBUG lines can dump dataset contents; keep them out of the log
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # a decoder's failure is logged by pydicom with a traceback per plugin; the job's reason names it
    logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)
