"""The native contract in a few lines: predict(series) returns a label map of the brightest tissue."""

import numpy as np

from pacsworker.worker.outputs import CodedTerm, LabelMap, SegmentSpec

DENSE = SegmentSpec(1, "Dense tissue", CodedTerm(scheme="SCT", value="85756007", meaning="Tissue"),
                    CodedTerm(scheme="SCT", value="3138006", meaning="Bone tissue"))


class BrightTissue:
    version = "0.1"

    def __init__(self, threshold: float = 300.0, device: str = "cpu"):
        self.threshold = threshold

    def predict(self, series):
        mask = (series.pixels >= self.threshold).astype(np.uint8)
        return LabelMap(mask, (DENSE,))
