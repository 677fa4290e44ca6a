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
