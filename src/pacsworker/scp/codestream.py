"""Which codec wrote a compressed frame, from the markers at the start of its codestream.

The receiver does not decode pixel data; it checks that the first fragment of encapsulated pixel
data begins the way the transfer syntax's codec begins a codestream, so that a dataset labelled
JPEG 2000 holding JPEG data (which a viewer would fail to decode later) is refused on arrival.
"""

from __future__ import annotations

import struct

from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

# how far into the first fragment its codec is looked for: a JPEG's frame header follows its tables
CODEC_PREFIX = 64 * 1024
JPEG, JPEG_LS, JPEG_2000, RLE = "JPEG", "JPEG-LS", "JPEG 2000", "RLE"
JPEG_OR_LS = "a JPEG start of image without a frame header in its first bytes"
# the codecs whose codestream a transfer syntax's fragments may begin
CODEC_OF_SYNTAX: dict[UID, set[str]] = {
    **{uid: {JPEG, JPEG_OR_LS} for uid in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)},
    **{uid: {JPEG_LS, JPEG_OR_LS} for uid in (JPEGLSLossless, JPEGLSNearLossless)},
    **{uid: {JPEG_2000} for uid in (JPEG2000Lossless, JPEG2000)},
    RLELossless: {RLE},
}
# JPEG start-of-frame markers (ITU T.81 B.1.1.3): SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_LS_SOF = 0xF7  # SOF55 (ITU T.87)
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # markers without a length: TEM, RSTn, SOI


def codec_of(start: bytes) -> str | None:
    """The codec whose codestream ``start`` (the first bytes of a frame's first fragment) begins, by its
    markers: JPEG or JPEG-LS (start of image, then the frame header's kind), JPEG 2000 (SOC and SIZ, or
    a JP2 signature box), RLE (its 64-byte header: 1-15 segments, the first at offset 64); else None."""
    if start.startswith(b"\xff\x4f\xff\x51") or start.startswith(b"\x00\x00\x00\x0cjP  "):
        return JPEG_2000
    if start.startswith(b"\xff\xd8"):
        at = 2
        while at + 4 <= len(start) and start[at] == 0xFF:
            marker = start[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
            elif marker in _JPEG_SOF:
                return JPEG
            elif marker == _JPEG_LS_SOF:
                return JPEG_LS
            elif marker in _STANDALONE:
                at += 2
            else:
                at += 2 + struct.unpack_from(">H", start, at + 2)[0]
        return JPEG_OR_LS
    if len(start) >= 64:
        segments, first_offset = struct.unpack_from("<LL", start)
        if 1 <= segments <= 15 and first_offset == 64:
            return RLE
    return None
