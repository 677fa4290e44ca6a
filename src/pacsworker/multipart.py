"""``multipart/related`` bodies as DICOMweb (STOW-RS) and the Arterys protocol use them."""

from __future__ import annotations

import re
import uuid


def encode_multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """``multipart/related`` body and its Content-Type from (content type, bytes) parts."""
    boundary = uuid.uuid4().hex
    chunks = []
    for content_type, payload in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + payload + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; boundary="{boundary}"'


def decode_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The (headers, payload) parts of a multipart body.

    Raises
    ------
    ValueError
        If the Content-Type names no boundary or the body holds no part.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type or "", re.IGNORECASE)
    if not match:
        raise ValueError(f"Content-Type {content_type!r} names no multipart boundary")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, separator, payload = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a part has no blank line after its headers")
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
    if not parts:
        raise ValueError("the body holds no multipart part")
    return parts
