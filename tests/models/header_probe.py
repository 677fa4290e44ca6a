"""A named-input model that checks every value it is given against the DICOM headers it reads itself.

It re-implements the expectations independently (pydicom only), so a wrong input fails loudly.
"""

from pathlib import Path

import numpy as np
import pydicom


def _expected(folder: Path) -> dict:
    headers = [pydicom.dcmread(p) for p in sorted(Path(folder).glob("*.dcm"))]
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    first = headers[0]
    age = first.get("PatientAge") or None
    months = None
    if age:
        number, unit = int(age[:3]), age[3]
        months = number * 12 if unit == "Y" else number if unit == "M" else None
    return {
        "uid": str(first.SeriesInstanceUID),
        "stored": np.stack([ds.pixel_array for ds in headers]),
        "slope": float(first.get("RescaleSlope", 1) or 1),
        "intercept": float(first.get("RescaleIntercept", 0) or 0),
        "months": months,
        "sex": first.get("PatientSex") or None,
        "thickness": float(first.SliceThickness) if first.get("SliceThickness") else None,
        "positions": [[float(v) for v in ds.ImagePositionPatient] for ds in headers],
        "spacing": [float(v) for v in first.PixelSpacing],
        "body_part": first.get("BodyPartExamined") or None,
        "photometric": str(first.PhotometricInterpretation),
    }


class HeaderProbe:
    version = "1.0"

    def __init__(self, folder: str, expect_slope: float | None = None, device: str = "cpu"):
        self.expected = _expected(Path(folder))
        if expect_slope is not None:  # lets a test prove that a wrong value is caught
            self.expected["slope"] = expect_slope

    def inference(self, pixel_array, rescale_slope, rescale_intercept, chronological_age_months, patient_sex,
                  slice_thickness, image_position_patient, pixel_spacing, body_part_examined,
                  photometric_interpretation):
        e = self.expected
        uid = e["uid"]
        assert list(pixel_array) == [uid], f"pixel_array keys {list(pixel_array)}, expected [{uid}]"
        stored = pixel_array[uid]
        assert stored.dtype == e["stored"].dtype, f"pixel_array dtype {stored.dtype}, expected {e['stored'].dtype}"
        assert np.array_equal(stored, e["stored"]), "pixel_array differs from the stored values in slice order"
        assert rescale_slope == {uid: e["slope"]}, f"rescale_slope {rescale_slope}, expected {e['slope']}"
        assert rescale_intercept == {uid: e["intercept"]}, f"rescale_intercept {rescale_intercept}"
        assert chronological_age_months == e["months"], f"age {chronological_age_months}, expected {e['months']}"
        assert patient_sex == e["sex"], f"sex {patient_sex!r}, expected {e['sex']!r}"
        assert slice_thickness == {uid: e["thickness"]}, f"slice_thickness {slice_thickness}"
        assert np.allclose(image_position_patient[uid], e["positions"]), "image_position_patient out of slice order"
        assert pixel_spacing == {uid: e["spacing"]}, f"pixel_spacing {pixel_spacing}"
        assert body_part_examined == {uid: e["body_part"]}, f"body_part_examined {body_part_examined}"
        assert photometric_interpretation == {uid: e["photometric"]}
        hu = stored.astype(np.float64) * rescale_slope[uid] + rescale_intercept[uid]
        return {
            "mask": {uid: (hu > np.percentile(hu, 90)).astype(np.uint8)},
            "bright_fraction": {uid: float((hu > np.percentile(hu, 90)).mean())},
            "unmapped": 1,
        }
