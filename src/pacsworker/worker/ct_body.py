"""Built-in ``ct-body``: body, lungs and bone on CT from Hounsfield thresholds and connected components.

It is written on the public ``kind: python`` API (a class with ``predict(series)`` returning a
``LabelMap``), so it is also the smallest worked example of wrapping a model.

Thresholds and masks are torch operations on the chosen device; connected-component labelling
uses cuCIM on a GPU when it is installed, scikit-image otherwise. The label map is exclusive
(no overlaps), so the SEG loads in viewers that reject overlapping segments.
"""

from __future__ import annotations

import numpy as np
import torch

from .outputs import ANATOMICAL_STRUCTURE as ANATOMICAL
from .outputs import TISSUE, CodedTerm, LabelMap, SegmentSpec
from .series import Series

BODY, LUNGS, BONE = 1, 2, 3

AIR_HU = -400.0  # below: air (outside the body, lungs, bowel gas)
BODY_HU = -500.0  # above: tissue of the body or the table
BONE_HU = 300.0  # above: cortical and dense trabecular bone
MIN_LUNG_ML = 10.0  # smaller internal air pockets are not lung


def _label(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """3D connected components (26-connectivity) of a boolean mask, on the mask's device."""
    if mask.is_cuda:
        try:
            # optional CUDA libraries without type information, absent where there is no GPU
            import cupy  # type: ignore[import-untyped, import-not-found, unused-ignore]
            from cucim.skimage.measure import label as cu_label  # type: ignore[import-untyped, import-not-found, unused-ignore]

            labels, count = cu_label(cupy.asarray(mask), return_num=True)
            return torch.as_tensor(labels, device=mask.device), int(count)
        except ImportError:
            pass
    from skimage.measure import label

    labels, count = label(mask.cpu().numpy(), return_num=True, connectivity=3)
    return torch.from_numpy(labels).to(mask.device), int(count)


class CtBodyModel:
    """Threshold model: a reference for the pipeline and a useful body/lung/bone map on CT."""

    name = "ct-body"
    version = "1.0.0"
    segments = (
        # SCT 38266002 Entire body (CID 4031): the finding a reader sees for its volume and length
        SegmentSpec(BODY, "Body", ANATOMICAL, CodedTerm(scheme="SCT", value="38266002", meaning="Entire body"),
                    "body outline excluding lungs and bone"),
        SegmentSpec(LUNGS, "Lungs", ANATOMICAL, CodedTerm(scheme="SCT", value="39607008", meaning="Lung")),
        SegmentSpec(BONE, "Bone", TISSUE, CodedTerm(scheme="SCT", value="3138006", meaning="Bone tissue")),
    )

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)

    def predict(self, series: Series) -> LabelMap:
        return LabelMap(self.labels(series.pixels, series.volume.voxel_volume_ml), self.segments)

    def labels(self, pixels: np.ndarray, voxel_ml: float) -> np.ndarray:
        hu = torch.from_numpy(pixels).to(self.device, dtype=torch.float32)
        air = hu < AIR_HU
        # air connected to the in-plane border of any slice is outside the patient
        air_labels, _ = _label(air)
        border = torch.cat([air_labels[:, 0, :], air_labels[:, -1, :], air_labels[:, :, 0], air_labels[:, :, -1]], 1)
        outside_ids = torch.unique(border)
        outside = torch.isin(air_labels, outside_ids[outside_ids > 0])
        inside_air = air & ~outside

        tissue = hu > BODY_HU
        labels = torch.zeros(hu.shape, dtype=torch.uint8, device=self.device)
        if not bool(tissue.any()):
            return labels.cpu().numpy()
        tissue_labels, _ = _label(tissue | inside_air)
        counts = torch.bincount(tissue_labels.flatten())
        counts[0] = 0
        body = tissue_labels == torch.argmax(counts)  # the patient, not the table or cables

        lung_labels, _ = _label(inside_air & body)
        lung_counts = torch.bincount(lung_labels.flatten())
        lung_counts[0] = 0
        min_voxels = MIN_LUNG_ML / voxel_ml
        lung_ids = torch.nonzero(lung_counts >= min_voxels).flatten()
        lungs = torch.isin(lung_labels, lung_ids) if len(lung_ids) else torch.zeros_like(body)

        labels[body] = BODY
        labels[lungs] = LUNGS
        labels[body & (hu >= BONE_HU)] = BONE
        return labels.cpu().numpy()
