"""Runs one model over one spooled series: volume -> label map -> SEG + SR. No queue, no network."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelSettings
from .models import SegmentationModel, builtin_model
from .volume import load_series

log = logging.getLogger(__name__)

_loaded: dict[tuple[str, str, str], SegmentationModel] = {}


def get_model(settings: ModelSettings) -> SegmentationModel:
    """The model for these settings, loaded once per process and kept warm."""
    key = (settings.kind, settings.source, settings.device)
    if key not in _loaded:
        started = time.perf_counter()
        _loaded[key] = builtin_model(settings.source, settings.device)
        log.info("model %s loaded in %.2f s", settings.name, time.perf_counter() - started)
    return _loaded[key]


@dataclass
class RunOutcome:
    """What a model run produced: result objects (or none, with the reason) and stage timings (s)."""

    seg: object | None = None
    sr: object | None = None
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    statistics: tuple = ()


def run_model(files: list[Path], settings: ModelSettings) -> RunOutcome:
    """Load the series, run the model and encode the results.

    Raises
    ------
    NotAVolumeError
        If the series is not one regularly sampled volume (the reason says why).
    """
    from ..encoders import encode_results

    outcome = RunOutcome()
    started = time.perf_counter()
    volume = load_series(files)
    outcome.timings["load_s"] = time.perf_counter() - started
    model = get_model(settings)
    started = time.perf_counter()
    labels = model.predict(volume)
    outcome.timings["model_s"] = time.perf_counter() - started
    started = time.perf_counter()
    results = encode_results(volume, labels, model)
    outcome.timings["encode_s"] = time.perf_counter() - started
    if results is None:
        outcome.reason = "the model found no segment"
        return outcome
    outcome.seg, outcome.sr, outcome.statistics = results.seg, results.sr, results.statistics
    return outcome
