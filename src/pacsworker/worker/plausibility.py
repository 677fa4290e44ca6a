"""Plausibility checks: does the input look like what the model is for, and does its result make sense?

Input checks run before the model, result checks after it and before anything is encoded. Each
failure is one sentence naming the check and the measured value, e.g. ``Brain volume_ml is 2650.3,
above the maximum 2100 (any age)``; the model's ``checks.on_fail`` decides whether the result is
withheld or delivered flagged.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..config import CheckCondition, InputCheck, PlausibilityChecks, ResultCheck
from .outputs import LabelMap, ModelResult, ProbabilityMaps, Score
from .series import Series

HEAD_SAMPLE_STEP = 2  # the Otsu threshold is taken on every 2nd voxel along each axis


def _condition_text(when: CheckCondition | None) -> str:
    if when is None:
        return "any age"
    parts = []
    if when.age_months is not None:
        low, high = when.age_months.min, when.age_months.max
        if low is not None and high is not None:
            parts.append(f"age {low:g} to {high:g} months")
        elif low is not None:
            parts.append(f"age at least {low:g} months")
        else:
            parts.append(f"age at most {high:g} months")
    if when.sex:
        parts.append("sex " + "/".join(when.sex))
    return ", ".join(parts)


def applies(when: CheckCondition | None, series: Series) -> bool:
    """Whether a check's conditions hold for the series' study-level facts (unknown facts match none)."""
    if when is None:
        return True
    if when.age_months is not None:
        age = series.patient_age_months
        if age is None or not when.age_months.holds(age):
            return False
    if when.sex is not None and series.patient_sex not in when.sex:
        return False
    return True


def _bound_failure(check: ResultCheck, value: float) -> str | None:
    if check.min is not None and value < check.min:
        side = f"below the minimum {check.min:g}"
    elif check.max is not None and value > check.max:
        side = f"above the maximum {check.max:g}"
    else:
        return None
    shown = f"{value:.1f}" if check.measure == "volume_ml" else f"{value:.4g}"
    return f"{check.describe()} is {shown}, {side} ({_condition_text(check.when)})"


def head_like_failures(series: Series, check: InputCheck) -> list[str]:
    """Whether the image looks like a head: varied foreground intensities, a head's extent."""
    from skimage.filters import threshold_otsu

    pixels = series.pixels
    sample = pixels[::HEAD_SAMPLE_STEP, ::HEAD_SAMPLE_STEP, ::HEAD_SAMPLE_STEP]
    if float(sample.max()) <= float(sample.min()):
        return ["head_like: the image is uniform"]
    foreground = pixels > threshold_otsu(sample)
    values = pixels[foreground]
    mean = float(values.mean())
    variation = float(values.std()) / abs(mean) if mean else 0.0
    failures = []
    if variation < check.min_variation:
        failures.append(
            f"head_like: the foreground's intensity varies by {variation:.3f} (coefficient of variation), below "
            f"{check.min_variation:g}: uniform like a phantom, not tissues"
        )
    extents = []
    for axis, spacing in enumerate(series.spacing):
        profile = foreground.sum(axis=tuple(a for a in range(3) if a != axis)).astype(np.float64)
        cumulative = np.cumsum(profile) / profile.sum()
        low, high = int(np.searchsorted(cumulative, 0.01)), int(np.searchsorted(cumulative, 0.99))
        extents.append((high - low + 1) * float(spacing))
    largest = max(extents)
    if not check.extent_mm.holds(largest):
        shown = ", ".join(f"{e:.0f}" for e in extents)
        failures.append(
            f"head_like: the foreground spans {shown} mm (slice, row, column); its largest extent "
            f"{largest:.0f} mm is outside {check.extent_mm.min:g}..{check.extent_mm.max:g} mm"
        )
    return failures


def input_failures(series: Series, checks: PlausibilityChecks) -> list[str]:
    """Every input check that fails, as sentences; empty when the input looks right."""
    failures = []
    for check in checks.inputs:
        if check.kind == "head_like":
            failures += head_like_failures(series, check)
    return failures


def _segment_mask(result: ModelResult, name: str, threshold: float) -> np.ndarray | None:
    """The named segment's mask: from a label map by its label, from probabilities at the threshold."""
    for output in result.outputs.values():
        if isinstance(output, LabelMap):
            for spec in output.segments:
                if spec.name == name:
                    return output.array == spec.label
        elif isinstance(output, ProbabilityMaps):
            for index, spec in enumerate(output.segments):
                if spec.name == name:
                    return output.array[index] >= threshold
    return None


def result_failures(result: ModelResult, series: Series, checks: PlausibilityChecks, threshold: float = 0.5) -> list[str]:
    """Every result check that applies and fails, as sentences; empty when the result is plausible.

    A check naming a segment or output the model did not return fails: a check that cannot be
    evaluated must not pass silently.
    """
    failures = []
    masks: dict[str, np.ndarray | None] = {}  # each named segment's mask, made once when a check needs it
    voxel_ml = float(np.prod(series.spacing)) / 1000.0
    for check in checks.results:
        if not applies(check.when, series):
            continue
        if check.output is not None:
            output = result.outputs.get(check.output)
            if not isinstance(output, Score):
                failures.append(f"{check.describe()}: the model returned no score {check.output!r}")
                continue
            value = float(output.value)
        else:
            segment = check.segment or ""  # ResultCheck names a segment when it names no output
            if segment not in masks:
                masks[segment] = _segment_mask(result, segment, threshold)
            mask = masks[segment]
            if mask is None:
                failures.append(f"{check.describe()}: the model returned no segment {check.segment!r}")
                continue
            if check.measure == "volume_ml":
                value = float(mask.sum()) * voxel_ml
            elif check.measure == "fov_fraction":
                value = float(mask.mean())
            else:
                value = float(ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))[1])
        failure = _bound_failure(check, value)
        if failure:
            failures.append(failure)
    return failures
