"""``multipart/related`` bodies as DICOMweb (STOW-RS) and the Arterys protocol use them (RFC 2046 5.1).

:class:`MultipartReader` parses a body as it arrives, so a receiver holds at most one chunk of it
whatever the size of a part; :func:`decode_multipart` reads a body already in memory with it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

MAX_PART_HEAD = 16 * 1024  # a part's header lines; more is not a DICOMweb part
MAX_DELIMITER_LINE = 1024  # a delimiter's transport padding


def encode_multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """``multipart/related`` body and its Content-Type from (content type, bytes) parts."""
    boundary = uuid.uuid4().hex
    chunks = []
    for content_type, payload in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + payload + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; boundary="{boundary}"'


def boundary_of(content_type: str) -> bytes:
    """The boundary a multipart Content-Type names.

    Raises
    ------
    ValueError
        If it names none.
    """
    match = re.search(r'boundary="?([^";]{1,70})"?', content_type or "", re.IGNORECASE)
    if not match:
        raise ValueError(f"Content-Type {content_type!r} names no multipart boundary")
    return match.group(1).strip().encode("latin-1")


@dataclass
class PartStart:
    """A part's header lines have arrived (names lower-case)."""

    headers: dict[str, str]


class PartEnd:
    """The current part's payload is complete: its closing delimiter arrived."""


class MultipartReader:
    """A multipart body parsed as it is fed: :meth:`feed` yields :class:`PartStart`, payload bytes
    and :class:`PartEnd` events in order; :meth:`finish` says whether the body ended properly.

    The buffer holds one fed chunk plus the length of the delimiter: payload bytes are handed on as
    soon as they cannot be the start of a delimiter.
    """

    def __init__(self, boundary: bytes):
        self.delimiter = b"\r\n--" + boundary
        self.buffer = bytearray(b"\r\n")  # the first delimiter may open the body, without a CRLF before it
        self.state = "preamble"
        self.parts = 0

    def feed(self, data: bytes) -> Iterator[PartStart | bytes | PartEnd]:
        """Parse ``data``, the next bytes of the body; the events come before an error that follows them.

        Raises
        ------
        ValueError
            If the body is not a multipart body (a delimiter followed by junk, a part head too long).
        """
        self.buffer += data
        step = {"preamble": self._preamble, "delimiter": self._after_delimiter, "head": self._head,
                "payload": self._payload, "epilogue": self._epilogue}
        more = True
        while more:
            events: list[PartStart | bytes | PartEnd] = []
            more = step[self.state](events)
            yield from events

    def finish(self) -> None:
        """The body has ended.

        Raises
        ------
        ValueError
            If it ended before its closing delimiter (inside a part, or before any).
        """
        if self.state != "epilogue":
            where = "inside a part" if self.state in ("head", "payload") else "before its closing delimiter"
            raise ValueError(f"the multipart body ends {where} (after {self.parts} part(s))")

    def _preamble(self, events: list) -> bool:
        found = self.buffer.find(self.delimiter)
        if found < 0:
            del self.buffer[:max(0, len(self.buffer) - len(self.delimiter))]  # preamble text is ignored
            return False
        del self.buffer[:found + len(self.delimiter)]
        self.state = "delimiter"
        return True

    def _after_delimiter(self, events: list) -> bool:
        if self.buffer[:2] == b"--":
            self.state = "epilogue"
            return True
        end = self.buffer.find(b"\r\n")
        if end < 0:
            if len(self.buffer) > MAX_DELIMITER_LINE or self.buffer[:1] not in (b"", b"-", b" ", b"\t", b"\r"):
                raise ValueError("a multipart delimiter is followed by something else than a line end")
            return False
        if self.buffer[:end].strip(b" \t"):
            raise ValueError("a multipart delimiter is followed by something else than a line end")
        del self.buffer[:end + 2]
        self.state = "head"
        return True

    def _head(self, events: list) -> bool:
        if self.buffer[:2] == b"\r\n":
            head, length = b"", 2  # a part without header lines
        else:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_PART_HEAD:
                    raise ValueError(f"a part's header lines exceed {MAX_PART_HEAD} bytes")
                return False
            head, length = bytes(self.buffer[:end]), end + 4
        del self.buffer[:length]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        events.append(PartStart(headers))
        self.state = "payload"
        return True

    def _payload(self, events: list) -> bool:
        found = self.buffer.find(self.delimiter)
        if found < 0:
            safe = len(self.buffer) - len(self.delimiter) + 1  # what cannot begin a delimiter
            if safe > 0:
                events.append(bytes(self.buffer[:safe]))
                del self.buffer[:safe]
            return False
        if found:
            events.append(bytes(self.buffer[:found]))
        del self.buffer[:found + len(self.delimiter)]
        events.append(PartEnd())
        self.parts += 1
        self.state = "delimiter"
        return True

    def _epilogue(self, events: list) -> bool:
        self.buffer.clear()  # after the closing delimiter: ignored
        return False


def decode_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The (headers, payload) parts of a whole multipart body.

    Raises
    ------
    ValueError
        If the Content-Type names no boundary, the body is malformed or cut short, or holds no part.
    """
    reader = MultipartReader(boundary_of(content_type))
    parts: list[tuple[dict[str, str], bytes]] = []
    payload: list[bytes] = []
    for event in reader.feed(body):
        if isinstance(event, PartStart):
            parts.append((event.headers, b""))
            payload = []
        elif isinstance(event, PartEnd):
            parts[-1] = (parts[-1][0], b"".join(payload))
        else:
            payload.append(event)
    reader.finish()
    if not parts:
        raise ValueError("the body holds no multipart part")
    return parts
