"""A toy model steered by flag files: it fails while ``fail_while`` exists (a model missing its GPU,
say), waits while ``hold_while`` exists (a long inference), and otherwise finds what is at least ``threshold``
(bone, by default)."""

import time
from pathlib import Path

import numpy as np


class Switchable:
    version = "1.0"

    def __init__(self, device: str = "cpu", fail_while: str = "", hold_while: str = "", threshold: float = 300.0):
        self.threshold = threshold
        self.fail_while = Path(fail_while) if fail_while else None
        self.hold_while = Path(hold_while) if hold_while else None

    def predict(self, series):
        if self.fail_while is not None and self.fail_while.exists():
            raise RuntimeError("CUDA out of memory (simulated)")
        deadline = time.monotonic() + 120
        while self.hold_while is not None and self.hold_while.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"bone": (series.pixels >= self.threshold).astype(np.uint8)}
