"""Model outputs to DICOM: highdicom SEG and TID 1500 SR, built completely or not at all."""

from .results import EncodedResults, encode_results

__all__ = ["EncodedResults", "encode_results"]
