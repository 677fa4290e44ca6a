"""Is a received dataset whole? Checked before the receiver answers Success, without decoding pixels.

The encoded dataset is walked element by element to its last byte (sequences, items and
encapsulated fragments included), its header is parsed by pydicom, and uncompressed pixel data
must have the length Rows x Columns x Samples x Bits Allocated x Frames implies. A deflated
dataset is inflated as a stream in small chunks that are discarded once walked, so memory stays
bounded whatever it inflates to. Only the few top-level elements the receiver reads (identity,
modality, image size) are kept and parsed, so private or unusual elements elsewhere never stop a
valid dataset.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian

from .codestream import CODEC_OF_SYNTAX, CODEC_PREFIX, JPEG_OR_LS, codec_of

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = {0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data", 0x7FE00010: "Pixel Data"}
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
MAX_NESTING = 32
INFLATE_CHUNK = 1 << 16
# what the receiver reads of a header: identity, what the pixel data length follows from, routing facts
HEADER_KEYWORDS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "PixelRepresentation",
    # what routing rules look at
    "SeriesDescription", "BodyPartExamined", "ImageType", "MRAcquisitionType", "ScanningSequence",
    "ImageOrientationPatient",
    # what series completion takes as evidence, and the contiguity check
    "ImagesInAcquisition", "ImagePositionPatient", "TemporalPositionIdentifier", "NumberOfTemporalPositions",
    "SpacingBetweenSlices",
]


def _tag(keyword: str) -> int:
    """The tag of a keyword of pydicom's dictionary (every keyword named here is one)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword} is not a DICOM keyword")
    return tag


HEADER_TAGS = {_tag(k) for k in HEADER_KEYWORDS}
MAX_HEADER_VALUE = 64 * 1024
# element and item headers, by byte order: tag + 4-byte length (implicit VR, items), tag + VR + 2-byte length
# (explicit VR; for a long VR the 2 bytes are reserved and a 4-byte length follows)
SHORT_HEADER = {order: struct.Struct(order + "HHL") for order in "<>"}
EXPLICIT_HEADER = {order: struct.Struct(order + "HH2sH") for order in "<>"}
LONG_LENGTH = {order: struct.Struct(order + "L") for order in "<>"}


def _is_vr(vr: bytes) -> bool:
    """Two upper-case letters, as every Value Representation is (PS3.5 6.2)."""
    return vr.isalpha() and vr.isupper()


def _bad_vr(group: int, element: int, vr: bytes, at: int) -> str:
    return (f"element ({group:04X},{element:04X}) at byte {at} has no valid VR (0x{vr.hex()}); "
            "no reader can parse what follows")


class IncompleteDataset(ValueError):
    """The dataset does not parse to its end, or its pixel data does not match its header."""


class _Truncated(Exception):
    pass


class _BytesSource:
    """Walks bytes already in memory; nothing is copied."""

    def __init__(self, data: bytes | memoryview):
        self.data = memoryview(data)
        self.pos = 0

    def read(self, count: int) -> memoryview:
        end = self.pos + count
        if end > len(self.data):
            raise _Truncated
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple:
        end = self.pos + layout.size
        if end > len(self.data):
            raise _Truncated
        values = layout.unpack_from(self.data, self.pos)
        self.pos = end
        return values

    def skip(self, count: int) -> None:
        if self.pos + count > len(self.data):
            raise _Truncated
        self.pos += count

    def at_end(self) -> bool:
        return self.pos >= len(self.data)



class _InflatingSource:
    """Walks a raw deflate stream, holding at most one chunk of inflated data."""

    def __init__(self, data: bytes | memoryview, max_inflated: int):
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.compressed = memoryview(data)
        self.fed = 0  # compressed bytes handed to the inflater so far
        self.pending: bytes | memoryview = b""
        self.buffer = bytearray()
        self.pos = 0
        self.inflated = 0
        self.max_inflated = max_inflated

    def _more(self) -> bytes:
        while not self.inflater.eof:
            if not self.pending:  # feed the input a slice at a time: zlib copies what it leaves unconsumed
                self.pending = self.compressed[self.fed:self.fed + INFLATE_CHUNK]
                self.fed += len(self.pending)
            try:
                out = self.inflater.decompress(self.pending, INFLATE_CHUNK)
            except zlib.error as exc:
                raise IncompleteDataset(f"deflated dataset is corrupt ({exc})") from None
            self.pending = self.inflater.unconsumed_tail
            if out:
                self.inflated += len(out)
                if self.inflated > self.max_inflated:
                    raise IncompleteDataset(f"deflated dataset inflates to more than {self.max_inflated} bytes")
                return out
            if not self.pending and self.fed >= len(self.compressed):
                break
        return b""

    def _fill(self, count: int) -> None:
        while len(self.buffer) < count:
            out = self._more()
            if not out:
                raise _Truncated
            self.buffer += out

    def _consume(self, count: int) -> None:
        del self.buffer[:count]
        self.pos += count

    def read(self, count: int) -> bytes:
        self._fill(count)
        chunk = bytes(self.buffer[:count])
        self._consume(count)
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple:
        return layout.unpack(self.read(layout.size))

    def skip(self, count: int) -> None:
        while count:
            if not self.buffer:
                self._fill(1)
            step = min(count, len(self.buffer))
            self._consume(step)
            count -= step

    def at_end(self) -> bool:
        if self.buffer:
            return False
        out = self._more()
        self.buffer += out
        if out:
            return False
        if not self.inflater.eof:
            raise IncompleteDataset("deflated dataset ends before its deflate stream does")
        return True


class _Walker:
    """Element-by-element walk of an encoded dataset (PS3.5 section 7)."""

    def __init__(self, source, implicit: bool, little: bool):
        self.src = source
        self.implicit = implicit
        self.order = "<" if little else ">"
        self.header = bytearray()  # the wanted top-level elements, re-framed in the same encoding
        self.values: dict[int, tuple[bytes, bytes]] = {}  # the same elements: tag -> (explicit VR or b"", value)
        self.pixel_tag = 0
        self.pixel_length: int | None = None
        self.fragments = 0
        self.first_fragment = b""  # the start of the first frame's fragment: which codec wrote it

    def walk(self) -> None:
        self._dataset(self.implicit, self.order, depth=0)

    def _dataset(self, implicit: bool, order: str, depth: int) -> None:
        """Walk elements to the end of the data (top level) or to an item delimiter (nested)."""
        if depth == 0 and type(self.src) is _BytesSource:  # (a subclass walks the general way)
            self._top_level_in_memory(implicit, order)
            return
        src = self.src
        header = SHORT_HEADER[order] if implicit else EXPLICIT_HEADER[order]
        long_length = LONG_LENGTH[order]
        while depth or not src.at_end():
            start = src.pos
            # an item delimiter's 4-byte length fills the same 8 bytes as an element header
            if implicit:
                group, element, length = src.unpack(header)
                vr = b""
            else:
                group, element, vr, length = src.unpack(header)
                if not _is_vr(vr) and group != 0xFFFE:
                    raise IncompleteDataset(_bad_vr(group, element, vr, start))
            tag = group << 16 | element
            if tag == ITEM_END:
                if depth:
                    return
                raise IncompleteDataset(f"item delimiter outside a sequence at byte {start}")
            if tag in (ITEM, SEQUENCE_END):
                raise IncompleteDataset(f"item tag outside a sequence at byte {start}")
            top_pixels = depth == 0 and tag in PIXEL_TAGS
            if vr in LONG_VRS:
                (length,) = src.unpack(long_length)
            if depth == 0 and tag in HEADER_TAGS and length != UNDEFINED:
                self._keep(tag, vr, length, implicit, order)
                continue
            if length != UNDEFINED:
                self.src.skip(length)
                if top_pixels:
                    self.pixel_tag, self.pixel_length = tag, length
                continue
            self._undefined_length(tag, vr, implicit, order, depth)

    def _top_level_in_memory(self, implicit: bool, order: str) -> None:
        """The top-level walk of :meth:`_dataset` over bytes in memory, with the element loop inlined
        (most elements are read here); sequences, encapsulated pixel data and kept elements go
        through the general methods, which continue from ``src.pos``."""
        src = self.src
        data, size, pos = src.data, len(src.data), src.pos
        unpack_header = (SHORT_HEADER[order] if implicit else EXPLICIT_HEADER[order]).unpack_from
        unpack_long = LONG_LENGTH[order].unpack_from
        vr = b""
        inline = True  # False while a general method walks: src.pos is then its own
        try:
            while pos < size:
                start = pos
                if size - pos < 8:
                    raise _Truncated
                if implicit:
                    group, element, length = unpack_header(data, pos)
                else:
                    group, element, vr, length = unpack_header(data, pos)
                    if not _is_vr(vr) and group != 0xFFFE:
                        raise IncompleteDataset(_bad_vr(group, element, vr, start))
                pos += 8
                tag = group << 16 | element
                if tag == ITEM_END:
                    raise IncompleteDataset(f"item delimiter outside a sequence at byte {start}")
                if tag in (ITEM, SEQUENCE_END):
                    raise IncompleteDataset(f"item tag outside a sequence at byte {start}")
                if vr in LONG_VRS:
                    if size - pos < 4:
                        raise _Truncated
                    (length,) = unpack_long(data, pos)
                    pos += 4
                if length != UNDEFINED:
                    if tag in HEADER_TAGS:
                        src.pos, inline = pos, False
                        self._keep(tag, vr, length, implicit, order)
                        pos, inline = src.pos, True
                        continue
                    if length > size - pos:
                        raise _Truncated
                    pos += length
                    if tag in PIXEL_TAGS:
                        self.pixel_tag, self.pixel_length = tag, length
                    continue
                src.pos, inline = pos, False
                self._undefined_length(tag, vr, implicit, order, 0)
                pos, inline = src.pos, True
        finally:
            if inline:
                src.pos = pos

    def _undefined_length(self, tag: int, vr: bytes, implicit: bool, order: str, depth: int) -> None:
        """Walk an element of undefined length: encapsulated pixel data, a sequence, or an undefined-length UN."""
        if tag == 0x7FE00010:  # encapsulated, at top level or in an icon image item
            fragments, first = self._fragments(order)
            if depth == 0 and tag in PIXEL_TAGS:
                self.pixel_tag, self.fragments, self.first_fragment = tag, fragments, first
        elif implicit or vr == b"SQ":
            self._sequence(implicit, order, depth + 1, tag)
        elif vr == b"UN":
            # an undefined-length UN holds an implicit VR little endian sequence (PS3.5 6.2.2)
            self._sequence(True, "<", depth + 1, tag)
        else:
            raise IncompleteDataset(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of VR {vr.decode('latin-1')} has undefined length"
            )

    def _keep(self, tag: int, vr: bytes, length: int, implicit: bool, order: str) -> None:
        if length > MAX_HEADER_VALUE:
            raise IncompleteDataset(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is {length} bytes long")
        value = bytes(self.src.read(length))
        self.values[tag] = (vr, value)
        if implicit:
            self.header += struct.pack(order + "HHL", tag >> 16, tag & 0xFFFF, length)
        elif vr in LONG_VRS:
            self.header += struct.pack(order + "HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, length)
        else:
            self.header += struct.pack(order + "HH2sH", tag >> 16, tag & 0xFFFF, vr, length)
        self.header += value

    def _sequence(self, implicit: bool, order: str, depth: int, tag: int) -> None:
        if depth > MAX_NESTING:
            raise IncompleteDataset(f"sequences nested deeper than {MAX_NESTING} levels")
        layout = SHORT_HEADER[order]
        while True:
            group, element, length = self.src.unpack(layout)
            item = group << 16 | element
            if item == SEQUENCE_END:
                return
            if item != ITEM:
                raise IncompleteDataset(f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) holds a non-item element")
            if length == UNDEFINED:
                self._dataset(implicit, order, depth)
            else:
                self.src.skip(length)

    def _fragments(self, order: str) -> tuple[int, bytes]:
        """The number of fragments after the Basic Offset Table, and the start of the first one."""
        count, first = -1, b""  # the first item is the Basic Offset Table
        layout = SHORT_HEADER[order]
        while True:
            group, element, length = self.src.unpack(layout)
            item = group << 16 | element
            if item == SEQUENCE_END:
                return max(count, 0), first
            if item != ITEM or length == UNDEFINED:
                raise IncompleteDataset("encapsulated pixel data holds a malformed fragment item")
            if count == 0:
                first = bytes(self.src.read(min(length, CODEC_PREFIX)))
                self.src.skip(length - len(first))
            else:
                self.src.skip(length)
            count += 1


def check_dataset(
    encoded: bytes | memoryview,
    transfer_syntax: str,
    max_inflated: int = 4 << 30,
) -> Header:
    """Check that an encoded dataset (no file meta) is whole; return its header.

    Parameters
    ----------
    encoded:
        The dataset as received, in ``transfer_syntax``.
    transfer_syntax:
        The presentation context's transfer syntax UID.
    max_inflated:
        A deflated dataset that inflates to more bytes than this is refused.

    Returns
    -------
    Header
        The header elements the receiver uses (``HEADER_KEYWORDS``).

    Raises
    ------
    IncompleteDataset
        With the reason: empty, cut short, malformed, or pixel data shorter than its header implies.
    """
    if not len(encoded):
        raise IncompleteDataset("the dataset is empty (0 bytes)")
    syntax = UID(transfer_syntax)
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    source = _InflatingSource(encoded, max_inflated) if syntax.is_deflated else _BytesSource(encoded)
    walker = _Walker(source, implicit, little)
    try:
        walker.walk()
    except _Truncated:
        raise IncompleteDataset(f"the dataset ends inside an element (after {source.pos} bytes)") from None
    except struct.error:
        raise IncompleteDataset(f"the dataset ends inside an element header (after {source.pos} bytes)") from None
    header = Header(walker.values, bytes(walker.header), implicit, little)
    _check_pixels(header, walker, syntax)
    return header


def _check_pixels(header: Header, walker: _Walker, syntax: UID) -> None:
    if not walker.pixel_tag:
        if all(header.get(k) not in (None, "") for k in ("Rows", "Columns", "BitsAllocated")):
            # an image header whose pixel data never came: cut at an element boundary
            raise IncompleteDataset("the header describes an image but the dataset holds no pixel data")
        return
    name = PIXEL_TAGS[walker.pixel_tag]
    if walker.pixel_length is None:
        if not syntax.is_encapsulated:
            raise IncompleteDataset(f"{name} is encapsulated but the transfer syntax {syntax} is not")
        if walker.fragments == 0:
            raise IncompleteDataset(f"encapsulated {name} holds no fragment")
        codecs = CODEC_OF_SYNTAX.get(syntax)
        found = codec_of(walker.first_fragment)
        if walker.first_fragment and codecs is not None and found not in codecs:
            raise IncompleteDataset(
                f"encapsulated {name} starts with {found or 'no known codestream'}, which does not match the "
                f"transfer syntax {syntax.name} ({' or '.join(sorted(c for c in codecs if c != JPEG_OR_LS))})")
        return
    if syntax.is_encapsulated and walker.pixel_tag == 0x7FE00010:
        raise IncompleteDataset(f"{name} of the compressed transfer syntax {syntax} is not encapsulated")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
               if header.get(k) in (None, "")]
    if missing:
        raise IncompleteDataset(f"{name} present but {', '.join(missing)} missing from the header")
    try:
        expected = expected_pixel_bytes(header)
    except Exception as exc:  # noqa: BLE001 - inconsistent image attributes
        raise IncompleteDataset(f"image attributes do not give a pixel data length ({exc})") from None
    if walker.pixel_length < expected:
        raise IncompleteDataset(
            f"{name} holds {walker.pixel_length} bytes, fewer than the {expected} that Rows x Columns x "
            "Samples x Bits Allocated x Frames imply"
        )


def expected_pixel_bytes(header) -> int:
    """Rows x Columns x Samples per Pixel x Frames x Bits Allocated / 8 (whole bytes for 1-bit data),
    two thirds of that for YBR_FULL_422 (PS3.3 C.7.6.3.1.2); pydicom's rule for the expected length."""
    length = int(header.get("Rows")) * int(header.get("Columns")) * int(header.get("SamplesPerPixel"))
    length *= int(header.get("NumberOfFrames") or 1)
    bits = int(header.get("BitsAllocated"))
    length = (length + 7) // 8 if bits == 1 else length * (bits // 8)
    if str(header.get("PhotometricInterpretation")).strip() == "YBR_FULL_422":
        length = length // 3 * 2
    return length


_US = {order: struct.Struct(order + "H") for order in "<>"}
# how the header's own elements are read without pydicom: keyword -> (tag, VR, kind)
_FAST = {
    keyword: (_tag(keyword), vr, kind)
    for keywords, vr, kind in (
        (("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"), b"UI", "text"),
        (("Modality", "PhotometricInterpretation", "BodyPartExamined", "MRAcquisitionType", "ImageType",
          "ScanningSequence"), b"CS", "text"),
        (("SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation"), b"US", "us"),
        (("NumberOfFrames", "ImagesInAcquisition", "TemporalPositionIdentifier", "NumberOfTemporalPositions"),
         b"IS", "int"),
        (("ImagePositionPatient", "ImageOrientationPatient", "SpacingBetweenSlices"), b"DS", "float"),
    )
    for keyword in keywords
}


class Header:
    """The top-level elements of a checked dataset that the receiver reads (``HEADER_KEYWORDS``).

    The values the receiver reads for every instance (UIDs, code strings, image size, geometry) are
    decoded here from their bytes; anything else, or a value that is not plain (another VR than the
    dictionary's, non-ASCII text, a number that does not parse), is read by pydicom as before, from a
    dataset it parses only then. ``get`` and attribute access behave like pydicom's: multiple values
    come as a list, an empty number as None.
    """

    def __init__(self, values: dict[int, tuple[bytes, bytes]], encoded: bytes, implicit: bool, little: bool):
        self._values = values
        self._encoded = encoded
        self._implicit, self._little = implicit, little
        self._dataset: Dataset | None = None

    def dataset(self) -> Dataset:
        """pydicom's reading of the same elements.

        Raises
        ------
        IncompleteDataset
            If pydicom cannot parse them.
        """
        if self._dataset is None:
            try:
                self._dataset = read_dataset(BytesIO(self._encoded), self._implicit, self._little)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on garbage
                raise IncompleteDataset(f"the dataset header does not parse ({type(exc).__name__})") from None
        return self._dataset

    def get(self, keyword: str, default=None):
        fast = _FAST.get(keyword)
        if fast is not None:
            tag, vr, kind = fast
            found = self._values.get(tag)
            if found is None:
                return default
            if found[0] in (b"", vr):  # implicit VR, or the dictionary's
                value = self._decode(found[1], kind)
                if value is not _UNREAD:
                    return value
        return self.dataset().get(keyword, default)

    def __getattr__(self, keyword: str):
        if keyword.startswith("_"):
            raise AttributeError(keyword)
        value = self.get(keyword, _UNREAD)
        if value is _UNREAD:
            raise AttributeError(f"the header has no {keyword}")
        return value

    def __contains__(self, keyword: str) -> bool:
        return tag_for_keyword(keyword) in self._values

    def _decode(self, raw: bytes, kind: str):
        if kind == "us":
            if len(raw) == 2:
                return _US["<" if self._little else ">"].unpack(raw)[0]
            return None if not raw else _UNREAD
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return _UNREAD
        parts = [part.strip(" \0") for part in text.split("\\")]
        if kind == "text":
            return parts[0] if len(parts) == 1 else parts
        if not text.strip(" \0"):
            return None
        try:
            numbers = [int(part) for part in parts] if kind == "int" else [float(part) for part in parts]
        except ValueError:
            return _UNREAD
        return numbers[0] if len(numbers) == 1 else numbers


_UNREAD = object()
