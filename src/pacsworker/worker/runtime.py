"""The one place a series becomes results: volume -> model -> encoders. ``run``, the Celery task
and the tests all call :func:`run_model`; no queue, no network here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelSettings
from .adapters import LoadedModel, load_model
from .outputs import Box, Boxes, LabelMap, ModelOutputError, ModelResult, ModelRunError
from .plausibility import input_failures, result_failures
from .series import Series
from .volume import Volume, load_series

log = logging.getLogger(__name__)

_loaded: dict[str, LoadedModel] = {}


def get_model(settings: ModelSettings) -> LoadedModel:
    """The model for these settings, loaded once per process and kept warm.

    Raises
    ------
    ModelLoadError
        If it cannot be loaded (tried again on the next job).
    """
    key = settings.model_dump_json(exclude={"match"})
    if key not in _loaded:
        started = time.perf_counter()
        _loaded[key] = load_model(settings)
        log.info("model %s loaded on %s in %.2f s", settings.name, _loaded[key].device, time.perf_counter() - started)
    return _loaded[key]


@dataclass
class RunOutcome:
    """What a model run produced: result objects (or none, with the reason), values, stage timings (s)."""

    seg: object | None = None
    sr: object | None = None
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    statistics: tuple = ()
    values: dict = field(default_factory=dict)
    volume: Volume | None = None
    label_map: LabelMap | None = None
    boxes: list[Box] = field(default_factory=list)
    implausible: list[str] = field(default_factory=list)  # failed plausibility checks, as sentences
    withhold: bool = True  # what the model's checks say to do when one fails

    @property
    def withheld(self) -> bool:
        """Whether failed plausibility checks keep the results from the PACS."""
        return bool(self.implausible) and self.withhold
    problems: list[str] = field(default_factory=list)  # why the results must not be delivered


def run_model(files: list[Path], settings: ModelSettings, predecessor=None) -> RunOutcome:
    """Load the series, run the model and encode the results.

    ``predecessor`` (an ``EarlierReport``) is the SR an earlier run of the model wrote for this
    series; the new SR names it as its predecessor.

    Raises
    ------
    NotAVolumeError
        If the series is not one regularly sampled volume (the reason says why).
    ModelLoadError, ModelRunError, ModelOutputError
        If the model cannot be loaded, raised while running, or returned something its
        configuration does not allow.
    """
    from ..encoders import encode_results
    from ..encoders.results import exclusive_labels
    from ..encoders.validation import validate_results

    outcome = RunOutcome()
    started = time.perf_counter()
    outcome.volume = volume = load_series(files)
    outcome.timings["load_s"] = time.perf_counter() - started
    model = get_model(settings)
    series = Series(volume)
    checks = settings.effective_checks()
    outcome.withhold = checks.on_fail == "withhold"
    started = time.perf_counter()
    outcome.implausible = input_failures(series, checks)
    outcome.timings["input_checks_s"] = time.perf_counter() - started
    if outcome.implausible and outcome.withhold:
        outcome.reason = "implausible input: " + "; ".join(outcome.implausible)
        return outcome  # the model is not run on what it is not for
    started = time.perf_counter()
    try:
        result: ModelResult = model.run(series)
    except ModelOutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the researcher's code: its message becomes the job's reason
        log.debug("model %s raised", settings.name, exc_info=True)
        raise ModelRunError(f"model {settings.name} raised {type(exc).__name__}: {exc}") from exc
    outcome.timings["model_s"] = time.perf_counter() - started
    outcome.values = result.values_json()
    started = time.perf_counter()
    outcome.implausible += result_failures(result, series, checks, settings.seg.threshold)
    outcome.timings["result_checks_s"] = time.perf_counter() - started
    maps = result.label_maps + result.probability_maps
    if len(maps) > 1:
        log.info("model %s returned %d maps; the first becomes the SEG", settings.name, len(maps))
    if maps:
        chosen = maps[0]
        outcome.label_map = chosen if isinstance(chosen, LabelMap) else exclusive_labels(chosen, settings.seg.threshold)
    outcome.boxes = [box for found in result.findings if isinstance(found, Boxes) for box in found.boxes]
    if not maps and not result.findings:
        outcome.reason = "the model returned no map, score, class or box"
        return outcome
    if outcome.implausible and outcome.withhold:
        outcome.reason = "implausible result: " + "; ".join(outcome.implausible)
        return outcome
    started = time.perf_counter()
    results = encode_results(volume, maps[:1] + result.findings, model.identity, settings.seg, predecessor,
                             flags=outcome.implausible)
    outcome.timings["encode_s"] = time.perf_counter() - started
    if results is None:
        # only empty maps and empty box lists reach here: scores and classes always make an SR
        outcome.reason = "the model found no segment" if maps else "the model found no box"
        if maps and any(isinstance(found, Boxes) for found in result.findings):
            outcome.reason = "the model found no segment and no box"
        return outcome
    outcome.seg, outcome.sr, outcome.statistics = results.seg, results.sr, results.statistics
    started = time.perf_counter()
    outcome.problems = validate_results(volume, results.seg, results.sr)
    outcome.timings["validate_s"] = time.perf_counter() - started
    return outcome


def write_values(outcome: RunOutcome, folder: Path) -> Path | None:
    """Scores, classes, boxes and probability summaries as ``outputs.json``, for people to read."""
    if not outcome.values:
        return None
    path = folder / "outputs.json"
    path.write_text(json.dumps(outcome.values, indent=2))
    return path
