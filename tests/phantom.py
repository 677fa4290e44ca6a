"""A cylinder phantom written as a 3D T1-weighted MR series whose headers say BRAIN.

What a scanner's QA scan looks like to routing: MR, 3D, ORIGINAL, body part BRAIN, a T1
description. Its fill is uniform (MR-like signal with noise), unlike a head's tissues.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_cylinder_series(folder: Path, *, slices: int = 96, size: int = 128, spacing: float = 2.0,
                          radius_mm: float = 90.0, height_mm: float = 170.0, age: str = "040Y",
                          seed: int = 0) -> Path:
    """One DICOM file per axial slice; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    centre = (size - 1) / 2
    rows, columns = np.mgrid[0:size, 0:size]
    disc = ((rows - centre) ** 2 + (columns - centre) ** 2) * spacing ** 2 <= radius_mm ** 2
    for index in range(slices):
        z = (index - (slices - 1) / 2) * spacing
        inside = disc if abs(z) <= height_mm / 2 else np.zeros_like(disc)
        image = np.where(inside, 620.0, 8.0) + rng.normal(0, 12, disc.shape)
        pixels = np.clip(image, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "QA^Phantom", "QA0001", "", "O", age
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "080000", "1", "", ""
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "MR", "test", "BRAIN"
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 7, index + 1, "T1 MPRAGE 3D"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.MRAcquisitionType, ds.ScanningSequence, ds.SequenceVariant = "3D", "GR\\IR", "SP\\MP"
        ds.ScanOptions, ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = "", 2300, 2.98, 3
        ds.ImagePositionPatient = [-centre * spacing, -centre * spacing, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [spacing, spacing], spacing, spacing
        ds.SliceLocation, ds.PositionReferenceIndicator = z, ""
        ds.Rows, ds.Columns = size, size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"slice{index:03d}.dcm", enforce_file_format=True)
    return folder
