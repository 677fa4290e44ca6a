"""Built-in ``mr-brain``: brain extraction on 3D T1-weighted head MR with deepbet (MIT).

deepbet's TorchScript weights ship inside its wheel; nothing is downloaded. It is written on the
public ``kind: python`` API: ``predict(series)`` returns a ``LabelMap`` with one segment, Brain.

deepbet has no rejection step of its own: on other contrasts, 2D stacks, or images without a head
it still returns its best guess of a brain mask, which is then wrong. The default routing sends it
3D T1 MR of the head or brain, and its default plausibility checks (``config.BUILTIN_CHECKS``)
withhold results on inputs that do not look like a head or brains of implausible size.
"""

from __future__ import annotations

import numpy as np

from ..config import brain_extra_installed
from .outputs import ANATOMICAL_STRUCTURE, CodedTerm, LabelMap, SegmentSpec
from .series import Series

BRAIN = SegmentSpec(1, "Brain", ANATOMICAL_STRUCTURE, CodedTerm(scheme="SCT", value="12738006", meaning="Brain"),
                    "brain parenchyma and CSF inside the skull (deepbet)")


class MrBrainModel:
    """deepbet's brain extraction, on the series' own grid."""

    name = "mr-brain"
    version = "deepbet-1.0.2"
    segments = (BRAIN,)

    def __init__(self, device: str = "cpu", threshold: float = 0.5):
        if not brain_extra_installed():
            raise ImportError("mr-brain needs the brain extra: pip install 'pacsworker[brain]' "
                              "and pip install --no-deps deepbet==1.0.2 (scripts/setup.sh does both)")
        from deepbet import BrainExtraction

        self.threshold = threshold
        self.extraction = BrainExtraction(no_gpu=not device.startswith("cuda"))

    def predict(self, series: Series) -> LabelMap:
        import nibabel as nib

        from .export import nifti_affine

        image = nib.Nifti1Image(np.ascontiguousarray(series.pixels.transpose(2, 1, 0)), nifti_affine(series))
        _, mask, _ = self.extraction.run(image, threshold=self.threshold)
        labels = np.asarray(mask.dataobj).astype(np.uint8).transpose(2, 1, 0)
        return LabelMap(np.ascontiguousarray(labels), self.segments)
