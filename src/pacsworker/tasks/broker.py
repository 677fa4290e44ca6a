"""The embedded broker: kombu's filesystem transport, made safe against a client killed mid-write.

kombu's transport writes a message straight under its final name and rewrites an exchange's table in
place, so a process killed in the middle (a Flower stopped with SIGKILL, a worker taken by the OOM
killer) leaves a truncated file that every consumer then fails to decode, again and again: the model
worker's consumer raised and the worker exited. Here every file appears whole or not at all (written
under a temporary name, then renamed in the same folder), and a message that still cannot be decoded
(written by another release, damaged on disk) is moved to ``undecodable/`` with a log line naming it,
instead of stopping the consumer. A job whose message is lost this way stays in the ledger as queued,
and recovery sends it again after ``queue.stale_after_seconds``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from queue import Empty

from kombu.transport import filesystem, virtual
from kombu.utils.json import dumps, loads

log = logging.getLogger("pacsworker.broker")

PARTIAL = ".partial"  # a file being written: never a message (kombu's names are "<ms>_<uuid>.<queue>.msg")
PARTIAL_MAX_AGE = 60.0  # seconds after which a partial file is a writer's remains, never finished
UNDECODABLE = "undecodable"


def write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the whole file or none of it."""
    partial = path.with_name(f".{uuid.uuid4().hex}{PARTIAL}")
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class Channel(filesystem.Channel):
    """kombu's filesystem channel with whole-file writes and undecodable messages set aside."""

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        try:
            write_whole(Path(self.data_folder_out) / name, dumps(payload).encode())
        except OSError as exc:
            raise filesystem.ChannelError(f"cannot add message {name} to {self.data_folder_out}: {exc}") from exc

    def _get(self, queue):
        wanted = f"{queue}.msg"
        folder = Path(self.data_folder_in)
        taken = Path(self.processed_folder)
        for name in sorted(os.listdir(folder)):
            if name.endswith(PARTIAL):
                self._remove_abandoned(folder / name)
                continue
            if name.partition(".")[2] != wanted:
                continue
            try:  # a rename in the same folder tree: only one consumer gets the message
                os.rename(folder / name, taken / name)
            except OSError:  # taken by another consumer meanwhile
                continue
            try:
                payload = (taken / name).read_bytes()
            finally:
                if not self.store_processed:
                    (taken / name).unlink(missing_ok=True)
            try:
                return loads(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                self._set_aside(name, payload, exc)
        raise Empty()

    def _set_aside(self, name: str, payload: bytes, exc: Exception) -> None:
        aside = Path(self.data_folder_in) / UNDECODABLE
        aside.mkdir(exist_ok=True)
        write_whole(aside / name, payload)
        log.warning("embedded broker: message %s (%d bytes) cannot be decoded (%s); moved to %s, the consumer goes on",
                    name, len(payload), str(exc)[:200], aside)

    @staticmethod
    def _remove_abandoned(path: Path) -> None:
        with contextlib.suppress(OSError):  # finished or removed meanwhile
            if time.time() - path.stat().st_mtime > PARTIAL_MAX_AGE:
                path.unlink()

    @contextlib.contextmanager
    def _table(self, exchange) -> Iterator[list]:
        """An exchange's table for changing, under a lock of its own (the table file itself is replaced)."""
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        with open(file.with_name(f"{file.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table = self.get_table(exchange)
            before = list(table)
            yield table
            if table != before:
                write_whole(file, dumps(table).encode())

    def get_table(self, exchange):
        file = self._exchange_file(exchange)
        try:
            text = file.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise filesystem.ChannelError(f"cannot read {file}: {exc}") from exc
        try:
            return [filesystem.exchange_queue_t(*q) for q in json.loads(text)]
        except (ValueError, TypeError) as exc:  # written by a kombu that rewrote it in place, and cut short
            log.warning("embedded broker: exchange table %s cannot be decoded (%s); its bindings are made again",
                        file, exc)
            return []

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with self._table(exchange) as table:
            if binding not in table:
                table.insert(0, binding)

    def _delete(self, queue, exchange, routing_key, pattern, *args, **kwargs):
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with self._table(exchange) as table:
            if binding in table:
                table.remove(binding)


class Transport(filesystem.Transport):
    """The embedded broker's transport (``broker_transport`` in the Celery configuration)."""

    Channel = Channel
    global_state = virtual.BrokerState()
