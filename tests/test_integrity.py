"""The receive-side dataset check on what the standard allows and on what is cut short."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGBaseline8Bit, generate_uid

from pacsworker.scp.integrity import IncompleteDataset, check_dataset

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _encoded(ds: Dataset, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _ids(ds: Dataset) -> Dataset:
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    return ds


def _fixture_datasets(dicom_dir):
    for folder in sorted(p for p in dicom_dir.iterdir() if p.is_dir()):
        path = sorted(folder.glob("*.dcm"))[0]
        raw = path.read_bytes()
        fp = BytesIO(raw)
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        yield folder.name, raw[fp.tell():], meta.TransferSyntaxUID


def test_every_fixture_passes_whole_and_fails_cut(dicom_dir):
    checked = 0
    for name, body, syntax in _fixture_datasets(dicom_dir):
        check_dataset(body, syntax)
        for cut in (len(body) - 1, len(body) // 2):
            with pytest.raises(IncompleteDataset):
                check_dataset(body[:cut], syntax)
        checked += 1
    assert checked >= 30


def test_an_image_cut_before_its_pixel_data_is_refused(dicom_dir):
    body = next(b for name, b, _ in _fixture_datasets(dicom_dir) if name.startswith("ct02"))
    end_of_header = body.index(struct.pack("<HH", 0x7FE0, 0x0010))  # an element boundary
    with pytest.raises(IncompleteDataset, match="holds no pixel data"):
        check_dataset(body[:end_of_header], "1.2.840.10008.1.2.1")


def test_encapsulated_icon_inside_a_sequence_item_is_walked():
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.SamplesPerPixel = 8, 8, 8, 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.PixelData = encapsulate([b"\xff\xd8icon\xff\xd9"])
    ds = _ids(Dataset())
    ds.IconImageSequence = [icon]
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 16, 16, 8, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([b"\xff\xd8frame\xff\xd9"])
    for element in (ds["PixelData"], icon["PixelData"]):
        element.is_undefined_length, element.VR = True, "OB"
    ds["IconImageSequence"].is_undefined_length = True
    icon.is_undefined_length_sequence_item = True
    body = _encoded(ds)
    header = check_dataset(body, JPEGBaseline8Bit)
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    with pytest.raises(IncompleteDataset, match="malformed fragment|ends inside"):
        check_dataset(body[:-8], JPEGBaseline8Bit)


def test_undefined_length_un_in_big_endian_holds_implicit_little_endian():
    head = _encoded(_ids(Dataset()), little=False)
    inner = struct.pack("<HHL", 0x0009, 0x0001, 2) + b"AB"
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    private = struct.pack(">HH2sHL", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF) + item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    creator = struct.pack(">HH2sH", 0x0009, 0x0010, b"LO", 4) + b"TEST"
    body = head + creator + private
    assert check_dataset(body, ExplicitVRBigEndian).Modality == "CT"


def test_deflated_object_without_pixel_data_keeps_only_its_header():
    ds = _ids(Dataset())
    head = _encoded(ds)
    blob = struct.pack("<HH2sHL", 0x0042, 0x0011, b"OB", 0, 80 << 20)  # Encapsulated Document, 80 MiB
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(head + blob) + deflater.compress(bytes(80 << 20)) + deflater.flush()
    header = check_dataset(body, DeflatedExplicitVRLittleEndian)
    assert header.SOPInstanceUID == ds.SOPInstanceUID


def test_native_pixel_data_length_follows_the_header():
    ds = _ids(Dataset())
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4, 5, 1, 1, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation, ds.NumberOfFrames = 1, "MONOCHROME2", 0, 3
    ds.PixelData = bytes(8)  # 4 x 5 x 3 bits = 60 bits -> 8 bytes
    assert check_dataset(_encoded(ds), "1.2.840.10008.1.2.1").NumberOfFrames == 3
    ds.PixelData = bytes(6)
    with pytest.raises(IncompleteDataset, match="holds 6 bytes, fewer than the 8"):
        check_dataset(_encoded(ds), "1.2.840.10008.1.2.1")


def _plain(value):
    """A header value as comparable plain data (pydicom's MultiValue, DSfloat, IS, UID as list, float, int, str)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return str(value).strip()


def test_header_values_read_without_pydicom_equal_pydicoms(dicom_dir):
    """Every header value the receiver reads itself equals pydicom's reading, for every catalogued series
    (implicit and explicit VR, big endian, deflated, compressed, enhanced), and so does the expected
    pixel data length."""
    from pydicom.pixels.utils import get_expected_length

    from pacsworker.scp.integrity import HEADER_KEYWORDS, expected_pixel_bytes

    compared = 0
    for name, body, syntax in _fixture_datasets(dicom_dir):
        header = check_dataset(body, syntax)
        reference = header.dataset()
        for keyword in HEADER_KEYWORDS:
            assert _plain(header.get(keyword)) == _plain(reference.get(keyword)), f"{name}: {keyword}"
            compared += keyword in reference
        if "PixelData" not in name and reference.get("Rows") and reference.get("BitsAllocated"):
            assert expected_pixel_bytes(header) == get_expected_length(reference, "bytes"), name
    assert compared > 300


def test_header_values_pydicom_must_read_are_left_to_it():
    """Text in another character set, a value under another VR than the dictionary's, and numbers that
    do not parse plainly are read by pydicom, as before."""
    ds = _ids(Dataset())
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SeriesDescription = "Thorax ÄÖÜ"
    ds.add_new(0x00280010, "SS", 64)  # Rows under another VR
    ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel, ds.PhotometricInterpretation = 2, 8, 1, "MONOCHROME2"
    ds.NumberOfFrames = "2.0"  # an IS pydicom accepts, int() does not
    ds.PixelData = bytes(64 * 2 * 2)
    header = check_dataset(_encoded(ds), "1.2.840.10008.1.2.1")
    assert header.get("SeriesDescription") == "Thorax ÄÖÜ"
    assert header.get("Rows") == 64 and header.get("NumberOfFrames") == 2
    assert header.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize(("photometric", "bits", "expected"), [("YBR_FULL_422", 8, 4 * 4 * 3 // 3 * 2), ("MONOCHROME2", 1, 2)])
def test_expected_pixel_length_follows_the_standards_special_cases(photometric, bits, expected):
    from pydicom.pixels.utils import get_expected_length

    from pacsworker.scp.integrity import expected_pixel_bytes

    ds = _ids(Dataset())
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 3 if photometric.startswith("YBR") else 1
    ds.PhotometricInterpretation, ds.BitsAllocated = photometric, bits
    ds.PixelData = bytes(expected)
    header = check_dataset(_encoded(ds), "1.2.840.10008.1.2.1")
    assert expected_pixel_bytes(header) == get_expected_length(ds, "bytes") == expected


def test_the_inlined_top_level_walk_agrees_with_the_general_one(dicom_dir):
    """The in-memory walk's fast loop and the general walk reach the same verdict, position and kept
    elements on every fixture, whole and cut at many points (inside headers, values, sequences)."""
    from pacsworker.scp.integrity import _BytesSource, _Truncated, _Walker

    class GeneralSource(_BytesSource):
        pass

    def outcome(source_type, body, implicit, little):
        walker = _Walker(source_type(body), implicit, little)
        try:
            walker.walk()
        except (_Truncated, IncompleteDataset) as exc:
            return type(exc).__name__, str(exc), walker.src.pos
        return walker.values, walker.pixel_tag, walker.pixel_length, walker.fragments, walker.src.pos

    compared = 0
    for name, body, syntax in _fixture_datasets(dicom_dir):
        if syntax == DeflatedExplicitVRLittleEndian:
            continue
        implicit, little = syntax == "1.2.840.10008.1.2", syntax != ExplicitVRBigEndian
        for cut in sorted({len(body), *range(0, min(len(body), 4000), 37), len(body) - 3, len(body) // 2}):
            fast = outcome(_BytesSource, body[:cut], implicit, little)
            assert fast == outcome(GeneralSource, body[:cut], implicit, little), f"{name} cut at {cut}"
            compared += 1
    assert compared > 1000


def test_an_element_without_a_valid_vr_is_refused():
    """Two bytes that are not a VR make every reader misframe what follows: refused, naming the element."""
    ds = _ids(Dataset())
    ds.SeriesDescription = "Thorax"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 1, "MONOCHROME2"
    ds.PixelData = bytes(4)
    body = bytearray(_encoded(ds))
    at = body.index(struct.pack("<HH", 0x0008, 0x103E))  # Series Description
    body[at + 4:at + 6] = b"\0\0"
    with pytest.raises(IncompleteDataset, match=r"element \(0008,103E\) at byte \d+ has no valid VR \(0x0000\)"):
        check_dataset(bytes(body), "1.2.840.10008.1.2.1")


@pytest.mark.parametrize("absent", ["SamplesPerPixel", "PhotometricInterpretation"])
def test_native_pixel_data_needs_every_attribute_its_length_follows_from(absent):
    ds = _ids(Dataset())
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 3, "RGB"
    delattr(ds, absent)
    ds.PixelData = bytes(16)  # a third of what RGB would need
    with pytest.raises(IncompleteDataset, match=f"{absent} missing from the header"):
        check_dataset(_encoded(ds), "1.2.840.10008.1.2.1")
