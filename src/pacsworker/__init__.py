"""pacsworker: DICOM receiver and model worker that returns DICOM SEG and TID 1500 SR to the PACS."""

__version__ = "0.1.0"
