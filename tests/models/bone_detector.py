"""A toy detector: a box around the largest bone region on the slices with the most bone, a class
saying whether bone was found and a score (the bone fraction); a bone mask too when asked."""

import numpy as np
from scipy import ndimage


class BoneDetector:
    version = "0.3"

    def __init__(self, device: str = "cpu", mask: bool = False, slices: int = 2, threshold: float = 300.0):
        self.mask, self.slices, self.threshold = mask, slices, threshold

    def predict(self, series):
        bone = series.pixels >= self.threshold
        areas = bone.reshape(bone.shape[0], -1).sum(axis=1)
        boxes = []
        for index in np.argsort(areas)[::-1][: self.slices]:
            if not areas[index]:
                continue
            regions, count = ndimage.label(bone[index])
            sizes = ndimage.sum(bone[index], regions, range(1, count + 1))
            rows, columns = np.nonzero(regions == int(np.argmax(sizes)) + 1)
            boxes.append({
                "slice": int(index),
                "top_left": [int(columns.min()), int(rows.min())],
                "bottom_right": [int(columns.max()) + 1, int(rows.max()) + 1],  # pixel edges
                "label": "Bone",
                "score": round(float(sizes.max() / areas.max()), 4),
            })
        outputs = {
            "boxes": boxes,
            "bone_present": {"value": int(bool(areas.sum())), "score": 0.9 if areas.sum() else 0.6},
            "bone_fraction": float(bone.mean()),
        }
        if self.mask:
            outputs["mask"] = bone.astype(np.uint8)
        return outputs
