"""Reference cases: a model is checked on series with known answers (mask, volumes, values).

What model vendors are asked to hand over with their model: ``pacsworker models test`` runs the
checks (the model's plausibility checks too), and a worker started with ``--check-models``
refuses to serve a model that fails them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..config import ModelSettings, ReferenceCase
from .runtime import run_model
from .volume import NotAVolumeError


@dataclass
class CaseResult:
    """How one reference case went: passed or not, each check's numbers, and the model time (s)."""

    case: ReferenceCase
    passed: bool
    checks: list[str] = field(default_factory=list)
    seconds: float = 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def check_case(settings: ModelSettings, case: ReferenceCase) -> CaseResult:
    result = CaseResult(case, passed=True)
    files = sorted(p for p in Path(case.input).rglob("*") if p.is_file())
    started = time.perf_counter()
    try:
        outcome = run_model(files, settings)
    except (NotAVolumeError, RuntimeError, ValueError) as exc:
        return CaseResult(case, False, [f"the model did not run: {exc}"])
    result.seconds = time.perf_counter() - started

    def record(ok: bool, text: str) -> None:
        result.passed &= ok
        result.checks.append(("pass: " if ok else "FAIL: ") + text)

    if case.implausible:
        record(bool(outcome.implausible), "fails the plausibility checks, as expected: " + (
            "; ".join(outcome.implausible) or "it passed them"))
    else:
        for failure in outcome.implausible:
            record(False, f"plausibility: {failure}")
        if not outcome.implausible and settings.effective_checks().results + settings.effective_checks().inputs:
            record(True, "plausibility checks")
    labels = outcome.label_map.array if outcome.label_map is not None else None
    if case.expected_mask is not None:
        if labels is None:
            record(False, "no label map to compare with the expected mask")
        else:
            image = nib.load(case.expected_mask)
            expected = np.asarray(image.dataobj).transpose(2, 1, 0)  # type: ignore[attr-defined]  # a NIfTI image
            if expected.shape != labels.shape:
                record(False, f"expected mask is {expected.shape}, the model's is {labels.shape}")
            else:
                score = dice(labels > 0, expected > 0)
                record(score >= case.min_dice, f"Dice {score:.4f} (at least {case.min_dice})")
    volumes = {stat.spec.name: stat.volume_ml for stat in outcome.statistics}
    for name, expected_ml in case.expected_volume_ml.items():
        found = volumes.get(name, 0.0)
        deviation = abs(found - expected_ml) / expected_ml if expected_ml else abs(found)
        record(deviation <= case.volume_tolerance,
               f"{name} {found:.1f} mL, expected {expected_ml:.1f} mL within {100 * case.volume_tolerance:g} % "
               f"(off by {100 * deviation:.1f} %)")
    for key, expected_value in case.expected_values.items():
        found = outcome.values.get(key, {}).get("value")
        ok = found is not None and abs(float(found) - expected_value) <= case.value_tolerance
        record(ok, f"{key} {found}, expected {expected_value} within {case.value_tolerance}")
    return result


def check_model(settings: ModelSettings) -> list[CaseResult]:
    """Every reference case of the model, in order."""
    return [check_case(settings, case) for case in settings.tests]
