"""The one place a series becomes results: volume -> model -> encoders. ``run``, the Celery task
and the tests all call :func:`run_model`; no queue, no network here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from ..config import ModelSettings
from .adapters import LoadedModel, ModelLoadError, load_model
from .model_files import files_digest, model_files
from .outputs import Box, Boxes, DicomObjects, LabelMap, ModelOutputError, ModelRunError
from .plausibility import input_failures, result_failures
from .series import Series, Study
from .tracebacks import load_traceback, model_traceback, raised_at
from .volume import NotAVolumeError, Volume, VolumeOutcome, load_series

log = logging.getLogger(__name__)

_loaded: dict[str, LoadedModel] = {}
_files_digests: dict[str, str] = {}  # by the same key: the digest of the files the warm model was loaded from


def get_model(settings: ModelSettings, say: bool = True) -> LoadedModel:
    """The model for these settings, loaded once per process and kept warm; loaded again when its
    files (:func:`~pacsworker.worker.model_files.model_files`) changed on disk since.

    Raises
    ------
    ModelLoadError
        If it cannot be loaded (tried again on the next job).

    ``say``: log the load at INFO (the start-up check says it in its own line).
    """
    key = settings.model_dump_json(exclude={"match"})
    if key in _loaded and files_digest(model_files(settings, _loaded[key])) != _files_digests[key]:
        log.warning("model %s: its files changed on disk since it was loaded; loading it again", settings.name)
        del _loaded[key]
        _reimport(settings)
    if key not in _loaded:
        started = time.perf_counter()
        try:
            _loaded[key] = load_model(settings)
        except ModelLoadError as exc:
            exc.traceback = load_traceback(exc)  # type: ignore[attr-defined]  # the job record keeps it
            raise
        _files_digests[key] = files_digest(model_files(settings, _loaded[key]))
        log.log(logging.INFO if say else logging.DEBUG, "model %s loaded on %s in %.2f s", settings.name,
                _loaded[key].device, time.perf_counter() - started)
    return _loaded[key]


def _reimport(settings: ModelSettings) -> None:
    """A ``package.module:Class`` model whose file changed: import the module again, or the new load
    would run the old code under the new files' digest (a ``/path/file.py`` is read anew anyway)."""
    module_name = str(getattr(settings, "source", "") or "").rpartition(":")[0]
    if settings.kind == "python" and module_name and not module_name.endswith(".py") and module_name in sys.modules:
        try:
            importlib.reload(sys.modules[module_name])
        except Exception as exc:  # noqa: BLE001 - the edited module does not import: its jobs fail with why
            raise ModelLoadError(f"model {settings.name}: {module_name} changed on disk and does not import again "
                                 f"({type(exc).__name__}: {exc})") from exc


def result_provenance(settings: ModelSettings) -> str:
    """Everything besides the input that can change a result: the settings' fingerprint and the
    digest of the model's files as loaded. Result UIDs derive from it (``encode_results``)."""
    return f"{settings.fingerprint()}|files:{_files_digests.get(settings.model_dump_json(exclude={'match'}), '')}"


@dataclass
class RunOutcome:
    """What a model run produced: result objects (or none, with the reason), values, stage timings (s).

    pacsworker's encoders make ``seg`` and ``sr``; a model that writes DICOM itself (a MONAI Deploy
    application) gives ``objects`` instead, by file name, with the other files it wrote
    (``app_files``, by relative path) and its log (``app_log``), which are kept and never delivered.
    """

    seg: Dataset | None = None
    sr: Dataset | None = None  # the measurement SR
    image_sr: Dataset | None = None  # lengths and boxes on source images
    objects: dict[str, Dataset] = field(default_factory=dict)
    app_files: dict[str, bytes] = field(default_factory=dict)
    app_log: str = ""
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    statistics: tuple = ()
    values: dict = field(default_factory=dict)
    volume: Volume | None = None
    label_map: LabelMap | None = None
    boxes: list[Box] = field(default_factory=list)
    implausible: list[str] = field(default_factory=list)  # failed plausibility checks, as sentences
    notes: list[str] = field(default_factory=list)  # what the loader accepted that is not regular (irregular gaps)
    withhold: bool = True  # what the model's checks say to do when one fails

    @property
    def withheld(self) -> bool:
        """Whether failed plausibility checks keep the results from the PACS."""
        return bool(self.implausible) and self.withhold
    problems: list[str] = field(default_factory=list)  # why the results must not be delivered

    @property
    def has_results(self) -> bool:
        """Whether there is anything to deliver: an SR of ours, or objects the model wrote."""
        return self.sr is not None or self.image_sr is not None or bool(self.objects)

    def result_objects(self) -> dict[str, Dataset]:
        """Every result object by its file name: ``seg.dcm``, ``sr.dcm``, ``image_sr.dcm``, or the model's own."""
        if self.objects:
            return dict(self.objects)
        ours = (("seg", self.seg), ("sr", self.sr), ("image_sr", self.image_sr))
        return {f"{role}.dcm": ds for role, ds in ours if ds is not None}


def run_model(files: list[Path], settings: ModelSettings, predecessor=None, on_stage=None) -> RunOutcome:
    """Load the series, run the model and encode the results.

    ``predecessor`` (``EarlierReport``s by role, ``sr`` and ``image_sr``) are the SRs an earlier run
    of the model wrote for this series; each new SR names the earlier one of its role as its
    predecessor. ``on_stage`` is told each stage as it starts (loading, model, encoding, validating).

    Raises
    ------
    NotAVolumeError
        If the series is not one regularly sampled volume (the reason says why).
    ModelLoadError, ModelRunError, ModelOutputError
        If the model cannot be loaded, raised while running, or returned something its
        configuration does not allow.
    """
    stage = on_stage or (lambda name: None)
    stage("loading")
    outcome = RunOutcome()
    started = time.perf_counter()
    outcome.volume = load_series(files, irregular_spacing=settings.irregular_spacing)
    outcome.timings["load_s"] = time.perf_counter() - started
    model = get_model(settings)
    series = Series(outcome.volume)
    return _run(outcome, model, settings, predecessor, [series], lambda: (series, model.run(series)), stage)


def run_study_model(files: list[list[Path]], settings: ModelSettings, predecessor=None, on_stage=None) -> RunOutcome:
    """A model of ``scope: study`` over several series of one study (each given by its files).

    The series that load as volumes are given to the model as a :class:`Study`; those that do not
    are named with the reason. The results are encoded on the series the model's outputs are on.

    Raises
    ------
    NotAVolumeError
        If no series of the study is a volume (each reason is given).
    ModelLoadError, ModelRunError, ModelOutputError
        As :func:`run_model`.
    """
    stage = on_stage or (lambda name: None)
    stage("loading")
    outcome = RunOutcome()
    started = time.perf_counter()
    loaded, not_volumes = [], {}
    for series_files in files:
        try:
            loaded.append(Series(load_series(series_files, irregular_spacing=settings.irregular_spacing)))
        except NotAVolumeError as exc:
            not_volumes[series_files[0].parent.name if series_files else "(empty)"] = str(exc)
    outcome.timings["load_s"] = time.perf_counter() - started
    if not loaded:
        reasons = "; ".join(f"{uid}: {why}" for uid, why in not_volumes.items())
        raise NotAVolumeError(VolumeOutcome.NOT_A_VOLUME, f"no series of the study is a volume ({reasons})")
    loaded.sort(key=lambda series: (_series_number(series), series.series_uid))
    model = get_model(settings)
    # PythonModel's; the settings allow scope: study for kind: python alone
    run_study = getattr(model, "run_study", None)
    if run_study is None:
        raise ModelRunError(f"model {settings.name}: scope: study needs kind: python (a class with predict(study))")
    study = Study(loaded, not_volumes)
    # what the model was given, all of it: the results' UIDs depend on it, not only on their series
    given = sorted(str(ds.SOPInstanceUID) for series in loaded for ds in series.volume.source_datasets)
    identity = hashlib.sha256("\n".join(given + sorted(not_volumes)).encode()).hexdigest()[:16]
    return _run(outcome, model, settings, predecessor, loaded, lambda: run_study(study), stage, identity)


def _series_number(series: Series) -> float:
    try:
        return float(series.first.get("SeriesNumber"))
    except (TypeError, ValueError):
        return float("inf")


def _run(outcome: RunOutcome, model: LoadedModel, settings: ModelSettings, predecessor, inputs: list[Series],
         call, stage, identity: str = "") -> RunOutcome:
    """Input checks, the model ``call`` (giving the series its outputs are on and its result), encoding."""
    from ..encoders import encode_results
    from ..encoders.results import exclusive_labels
    from ..encoders.validation import validate_results

    checks = settings.effective_checks()
    outcome.withhold = checks.on_fail == "withhold"
    started = time.perf_counter()
    outcome.implausible = [failure for series in inputs for failure in input_failures(series, checks)]
    outcome.timings["input_checks_s"] = time.perf_counter() - started
    if outcome.implausible and outcome.withhold:
        outcome.reason = "implausible input: " + "; ".join(outcome.implausible)
        return outcome  # the model is not run on what it is not for
    stage("model")
    started = time.perf_counter()
    try:
        series, result = call()
    except (ModelOutputError, ModelRunError):
        raise  # the adapter's own words: already the reason
    except Exception as exc:  # noqa: BLE001 - the researcher's code: its message becomes the job's reason
        where = raised_at(exc)
        error = ModelRunError(f"{type(exc).__name__} in model {settings.name}{f' ({where})' if where else ''}: {exc}")
        error.traceback = model_traceback(exc)  # type: ignore[attr-defined]  # the job record keeps it
        raise error from exc
    outcome.timings["model_s"] = time.perf_counter() - started
    outcome.volume = volume = series.volume
    outcome.notes = list(volume.notes)
    outcome.values = result.values_json()
    started = time.perf_counter()
    outcome.implausible += result_failures(result, series, checks, settings.seg.threshold)
    outcome.timings["result_checks_s"] = time.perf_counter() - started
    if result.dicom_objects:
        outcome.label_map = next(iter(result.label_maps), None)  # the model's first SEG, decoded
        return _accept_dicom_objects(outcome, result.dicom_objects, volume)
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
    stage("encoding")
    started = time.perf_counter()
    results = encode_results(volume, maps[:1] + result.findings, model.identity, settings.seg, predecessor,
                             flags=outcome.implausible, inputs=identity, provenance=result_provenance(settings))
    outcome.timings["encode_s"] = time.perf_counter() - started
    if results is None:
        # only empty maps and empty box lists reach here: scores and classes always make an SR
        outcome.reason = "the model found no segment" if maps else "the model found no box"
        if maps and any(isinstance(found, Boxes) for found in result.findings):
            outcome.reason = "the model found no segment and no box"
        return outcome
    outcome.seg, outcome.sr, outcome.image_sr = results.seg, results.sr, results.image_sr
    outcome.statistics = results.statistics
    measured = "segments" if "segments" not in outcome.values else "measured_segments"  # a model's own output keeps its key
    outcome.values[measured] = segment_values(results.statistics, volume.modality)
    stage("validating")
    started = time.perf_counter()
    outcome.problems = validate_results(volume, results.seg, results.sr, results.image_sr)
    outcome.timings["validate_s"] = time.perf_counter() - started
    return outcome


def _accept_dicom_objects(outcome: RunOutcome, made: list[DicomObjects], volume: Volume) -> RunOutcome:
    """Objects a model wrote itself: named, then through the same validation gate as ours."""
    from ..encoders.validation import validate_objects

    for part in made:
        outcome.app_files.update(part.files)
    outcome.app_log = "\n".join(part.log for part in made if part.log)
    datasets = [ds for part in made for ds in part.datasets]
    if outcome.implausible and outcome.withhold:
        outcome.reason = "implausible result: " + "; ".join(outcome.implausible)
        return outcome
    if not datasets:
        outcome.reason = "the application wrote no DICOM object"
        return outcome
    outcome.objects = object_names(datasets)
    started = time.perf_counter()
    outcome.problems = validate_objects(volume, outcome.objects)
    outcome.timings["validate_s"] = time.perf_counter() - started
    return outcome


def object_names(datasets: list[Dataset]) -> dict[str, Dataset]:
    """File names for objects a model wrote: ``app-<modality>-<n>.dcm`` (``app-seg-1.dcm``), in order."""
    named: dict[str, Dataset] = {}
    counts: dict[str, int] = {}
    for ds in datasets:
        kind = re.sub(r"[^a-z0-9]", "", str(ds.get("Modality", "") or "").lower()) or "object"
        counts[kind] = counts.get(kind, 0) + 1
        named[f"app-{kind}-{counts[kind]}.dcm"] = ds
    return named


def segment_values(statistics, modality: str) -> dict:
    """Each segment's measurements, by name, as the SR reports them (for the job record and ``status``)."""
    unit = "HU" if modality == "CT" else ""  # other modalities' values have no fixed unit
    return {
        stat.spec.name: {
            "volume_ml": round(stat.volume_ml, 2), "voxels": stat.voxels,
            "mean": round(stat.mean_value, 2), "sd": round(stat.sd_value, 2), "unit": unit,
            **({"longest_diameter_mm": round(stat.diameter.length_mm, 1)} if stat.diameter else {}),
        }
        for stat in statistics
    }


def write_values(outcome: RunOutcome, folder: Path) -> Path | None:
    """Scores, classes, boxes and probability summaries as ``outputs.json``, for people to read."""
    if not outcome.values:
        return None
    path = folder / "outputs.json"
    path.write_text(json.dumps(outcome.values, indent=2))
    return path
