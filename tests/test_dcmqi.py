"""dcmqi, the reference SEG reader, reads back every SEG type pacsworker writes, voxel for voxel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import missing
from scipy.special import expit

from pacsworker.config import ModelSettings
from pacsworker.worker.export import nifti_affine
from pacsworker.worker.runtime import run_model
from pacsworker.worker.series import Series

MODELS = Path(__file__).parent / "models"
SOFT = ModelSettings(name="soft", kind="python", source=f"{MODELS / 'soft_tissue.py'}:SoftTissue", outputs={
    "prob": {"kind": "probabilities", "segments": [{"label": 1, "name": "Soft tissue"}, {"label": 2, "name": "Bone"}]}})
CASES = {
    "binary": ("ct06_ge_lightspeed_liver_3slice", ModelSettings(name="ct-body")),
    "labelmap": ("ct06_ge_lightspeed_liver_3slice", ModelSettings(name="ct-body", seg={"labelmap_as": "labelmap"})),
    "fractional": ("ct06_ge_lightspeed_liver_3slice", SOFT),
    "binary-multiframe-sagittal": ("mr06_siemens_prisma_xa30_t1_enhanced_multiframe",
                                   ModelSettings(name="mr-brain", kind="builtin", source="mr-brain")),
}


def _reader() -> str:
    tool = shutil.which("segimage2itkimage", path=str(Path(sys.executable).parent))
    if tool is None:
        missing("dcmqi's segimage2itkimage (pip install dcmqi; the README's test command installs it)")
    return tool


def _in_our_grid(image: nib.Nifti1Image, ours: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Where dcmqi's volume (the frames' extent) sits in our grid; geometry must agree within 1e-3 mm."""
    assert np.allclose(image.affine[:3, :3], ours[:3, :3], atol=1e-3), f"axes or spacing differ:\n{image.affine}"
    start = np.round((np.linalg.inv(ours) @ image.affine)[:3, 3]).astype(int)
    origin = (ours @ [*start, 1])[:3]
    assert np.allclose(image.affine[:3, 3], origin, atol=1e-3), f"origin {image.affine[:3, 3]} vs {origin} mm"
    return np.asarray(image.dataobj), tuple(slice(s, s + n) for s, n in zip(start, image.shape[:3]))


@pytest.mark.parametrize("case", list(CASES))
def test_dcmqi_reads_back_what_the_model_returned(dicom_dir, tmp_path, case):
    tool = _reader()
    folder, settings = CASES[case]
    outcome = run_model(sorted((dicom_dir / folder).glob("*.dcm")), settings)
    (tmp_path / "dcmqi").mkdir()
    outcome.seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    result = subprocess.run([tool, "--inputDICOM", str(tmp_path / "seg.dcm"), "--outputDirectory", str(tmp_path / "dcmqi"),
                             "-t", "nifti"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    series = Series(outcome.volume)
    affine = nifti_affine(series)
    numbers = {s.spec.label: s.segment_number for s in outcome.statistics}
    grid = outcome.volume.pixels.shape[::-1]  # (columns, rows, slices), as NIfTI holds it
    recovered = np.zeros((len(numbers), *grid), dtype=np.int32)
    for path in sorted((tmp_path / "dcmqi").glob("*.nii.gz")):
        data, where = _in_our_grid(nib.load(path), affine)
        if case == "labelmap":
            for number in range(1, len(numbers) + 1):
                recovered[number - 1][where] = np.where(data == number, number, 0)
        else:
            number = int(path.name.split(".")[0])  # one file per segment, named by its number
            recovered[number - 1][where] = data
    if case == "fractional":
        hu = outcome.volume.pixels.astype(np.float32)
        maps = [expit(hu / 30) * expit(-(hu - 200) / 30), expit((hu - 250) / 40)]
        expected = np.stack([np.rint(m * 255).transpose(2, 1, 0) for m in maps])
        assert np.abs(recovered - expected).max() <= 1  # 8-bit probabilities
    else:
        labels = outcome.label_map.array.transpose(2, 1, 0)
        expected = np.stack([np.where(labels == label, number, 0) for label, number in sorted(numbers.items())])
        assert np.array_equal(recovered, expected), f"{int((recovered != expected).sum())} voxels differ"
