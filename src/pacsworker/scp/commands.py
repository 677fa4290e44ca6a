"""DIMSE command sets as bytes (PS3.7 6.3.1, Implicit VR Little Endian, group 0000): read, checked, answered.

The receiver reads a C-STORE-RQ's command set and builds its C-STORE-RSP here, on the fast path and
on pynetdicom's path alike, so that both refuse the same requests with the same answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..logs import printable
from ..records import is_valid_uid
from .pynetdicom_adapter import is_storage_class

C_STORE_RQ_FIELD = 0x0001  # Command Field values
C_STORE_RSP_FIELD = 0x8001
NO_DATASET = 0x0101
# C-STORE failures answered before storage (PS3.7 C.4.2.1.4, PS3.4 B.2.3)
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")


def read_command(data: bytes | memoryview) -> dict[int, bytes] | None:
    """The elements of a DIMSE command set (Implicit VR Little Endian, group 0000) by element number,
    or None when it is not one (another group, a length past the end)."""
    elements, offset, size = {}, 0, len(data)
    while offset < size:
        if size - offset < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0 or length > size - offset:
            return None
        elements[element] = bytes(data[offset:offset + length])
        offset += length
    return elements


def uid_value(value: bytes | None) -> str | None:
    """A UI value as text, its padding stripped (None when absent)."""
    return None if value is None else value.rstrip(b"\0 ").decode("latin-1").strip()


def us_value(value: bytes | None) -> int | None:
    """A US value (None when absent or not 2 bytes)."""
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def command_group_length_error(encoded: bytes | memoryview) -> str | None:
    """What is wrong with a command set's (0000,0000) Command Group Length, if anything: it comes first
    and counts the bytes after it (PS3.7 6.3.1, E.1)."""
    if len(encoded) < 12 or _ELEMENT.unpack_from(encoded, 0) != (0, 0x0000, 4):
        return "no Command Group Length first"
    (value,) = struct.unpack_from("<L", encoded, 8)
    if value != len(encoded) - 12:
        return f"a Command Group Length of {value} bytes where {len(encoded) - 12} follow"
    return None


@dataclass(frozen=True)
class StoreRefusal:
    """A C-STORE-RQ answered with a failure before any storage: the status, why, and what the answer echoes."""

    status: int
    reason: str
    message_id: int
    sop_class: str
    instance: str
    has_dataset: bool


def store_refusal(encoded: bytes | memoryview, command: dict[int, bytes], context) -> StoreRefusal | None:
    """Why the C-STORE-RQ ``command`` (its command set ``encoded``) on ``context`` is refused before storage,
    or None when the Storage handler may have it. One answer for the fast path and pynetdicom's: each
    hands over only what this passes.

    Parameters
    ----------
    context:
        The accepted presentation context the command came on (pynetdicom's ``PresentationContext``).
    """
    raw_class, raw_instance = command.get(0x0002) or b"", command.get(0x1000) or b""
    sop_class, instance = uid_value(raw_class) or "", uid_value(raw_instance) or ""
    data_set_type = us_value(command.get(0x0800))
    has_dataset = data_set_type is not None and data_set_type != NO_DATASET
    status, reason = STATUS_CANNOT_UNDERSTAND, command_group_length_error(encoded)
    if reason is None and us_value(command.get(0x0110)) is None:
        reason = "no Message ID"
    elif reason is None and us_value(command.get(0x0700)) is None:
        reason = "no Priority"
    elif reason is None and (not raw_class.isascii() or sop_class != str(context.abstract_syntax)):
        status, reason = STATUS_SOP_CLASS_NOT_SUPPORTED, (
            f"SOP class '{printable(sop_class)}' is not its presentation context's ({context.abstract_syntax})")
    elif reason is None and not is_storage_class(sop_class):
        status, reason = STATUS_SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not a storage class"
    elif reason is None and not (raw_instance.isascii() and is_valid_uid(instance)):
        status, reason = STATUS_DATASET_MISMATCH, "its Affected SOP Instance UID is not one valid UID"
    elif reason is None and not has_dataset:
        reason = "it announces no dataset"
    if reason is None:
        return None
    return StoreRefusal(status, reason, us_value(command.get(0x0110)) or 0, sop_class, instance, has_dataset)


def _ui(tag_element: int, value: str) -> bytes:
    raw = value.encode("latin-1", "replace")
    raw += b"\0" * (len(raw) % 2)
    return _ELEMENT.pack(0, tag_element, len(raw)) + raw


def _us_element(tag_element: int, value: int) -> bytes:
    return _ELEMENT.pack(0, tag_element, 2) + _US.pack(value & 0xFFFF)


def store_response(message_id: int, sop_class: str, instance: str, status: int) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), group length first."""
    body = b"".join((
        _ui(0x0002, sop_class),
        _us_element(0x0100, C_STORE_RSP_FIELD),
        _us_element(0x0120, message_id),
        _us_element(0x0800, NO_DATASET),
        _us_element(0x0900, status),
        _ui(0x1000, instance),
    ))
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<L", len(body)) + body


def command_fragments(command: bytes, peer_max_length: int) -> list[tuple[int, bytes]]:
    """``command`` as (control header, fragment) PDVs that fit the peer's Maximum Length (0: no limit);
    the association is refused for a Maximum Length too small to carry a byte (wire.MIN_PEER_MAXIMUM_LENGTH)."""
    step = len(command) if not peer_max_length else max(1, peer_max_length - 6)
    return [(0x03 if start + step >= len(command) else 0x01, command[start:start + step])
            for start in range(0, len(command), step)]
