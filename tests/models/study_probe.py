"""A toy study model: bone on the series whose description matches ``target``, and how many series
of the study it was given (volumes, and not)."""

import numpy as np


class StudyProbe:
    version = "1.0"

    def __init__(self, device: str = "cpu", target: str = "."):
        self.target = target

    def predict(self, study):
        series = study.find(self.target)
        if series is None:
            raise ValueError(f"no series of the study matches {self.target!r}")
        return series, {
            "bone": (series.pixels >= 300).astype(np.uint8),
            "volumes": float(len(study.series)),
            "not_volumes": float(len(study.not_volumes)),
        }
