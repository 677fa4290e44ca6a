"""Probability maps: soft tissue and bone as smooth functions of HU (two segments that overlap)."""

import numpy as np
from scipy.special import expit


class SoftTissue:
    version = "0.1"

    def __init__(self, device: str = "cpu"):
        pass

    def predict(self, series):
        hu = series.pixels.astype(np.float32)
        soft = expit(hu / 30) * expit(-(hu - 200) / 30)
        bone = expit((hu - 250) / 40)
        return {"prob": np.stack([soft, bone])}
