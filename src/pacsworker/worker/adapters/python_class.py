"""``kind: python``: a researcher's class, called through ``predict(series)`` or ``inference(...)``.

``predict(series)`` gets a :class:`~pacsworker.worker.series.Series`; ``inference(...)`` gets only
the named DICOM-derived inputs its signature asks for. Either returns an output object, a dict of
named outputs (mapped by the model's ``outputs:`` configuration), or a bare array when the
configuration names exactly one output.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import torch

from ...config import BuiltinModelSettings, OutputConfig, PythonModelSettings
from ..outputs import (
    Box,
    Boxes,
    Classification,
    CodedTerm,
    DicomObjects,
    LabelMap,
    ModelIdentity,
    ModelOutputError,
    ModelResult,
    ModelRunError,
    ProbabilityMaps,
    Score,
    SegmentSpec,
)
from ..series import NAMED_INPUTS, Series, Study

log = logging.getLogger("pacsworker.worker")
OUTPUT_TYPES = (LabelMap, ProbabilityMaps, Score, Classification, Boxes)


def import_class(source: str) -> type:
    """``package.module:Class`` or ``/path/to/file.py:Class``.

    A file is loaded as a module of a package made for its folder, with the folder on ``sys.path``
    while it loads: ``import helper`` and ``from . import helper`` both find ``helper.py`` beside
    it. A module of that folder whose name another model's folder (or an installed package)
    already took is loaded from this folder for this file, and the other stays as it was.
    """
    module_name, sep, class_name = source.rpartition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"source {source!r} must be 'package.module:Class' or '/path/file.py:Class'")
    if module_name.endswith(".py"):
        module = _load_file(Path(module_name).expanduser().resolve())
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise AttributeError(f"{module_name} has no class {class_name}") from None


def _load_file(path: Path) -> types.ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    folder = path.parent
    package_name = "pacsworker_model_" + hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    if package_name not in sys.modules:
        package = types.ModuleType(package_name)
        package.__path__ = [str(folder)]
        package.__package__ = package_name
        sys.modules[package_name] = package
    name = f"{package_name}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"model file {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    # top-level names of the folder's own modules: while the file loads, they must be this folder's
    own = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    own.discard(path.stem)
    shadowed = {n: sys.modules.pop(n) for n in sorted(own) if n in sys.modules and _of_other_model(sys.modules[n], folder)}
    sys.path.insert(0, str(folder))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(str(folder))
        sys.modules.update(shadowed)  # the other folder's modules are theirs again; ours live on in the model
    return module


def _of_other_model(module: types.ModuleType, folder: Path) -> bool:
    """Whether a loaded module came from another model's folder: not this one, nor anywhere on
    ``sys.path`` (the standard library and installed packages are never replaced)."""
    location = getattr(module, "__file__", None)
    if not location:
        return False
    where = Path(location).resolve()
    roots = [Path(entry or ".").resolve() for entry in sys.path]
    return not where.is_relative_to(folder) and not any(where.is_relative_to(root) for root in roots)


def file_digest(path: Path) -> str:
    """``sha256:`` and the first 12 hex digits of a file's SHA-256: the version of a model that
    names none, so other weights or code give other result UIDs and say so in the results."""
    with open(path, "rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()[:12]


def _source_digest(cls: type) -> str:
    """The digest of the file that defines ``cls``; "0" when it has none (a class made at run time)."""
    try:
        source = inspect.getsourcefile(cls)
        return file_digest(Path(source)) if source else "0"
    except (TypeError, OSError):
        return "0"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def segments_of(config: OutputConfig) -> tuple[SegmentSpec, ...]:
    return tuple(
        SegmentSpec(s.label, s.name, CodedTerm.from_triple(s.category), CodedTerm.from_triple(s.property_type),
                    s.description, (s.color[0], s.color[1], s.color[2]) if s.color else None)
        for s in config.segments
    )


class PythonModel:
    """A model class loaded once; ``run`` calls whichever contract the class implements."""

    def __init__(self, settings: BuiltinModelSettings | PythonModelSettings, source: str):
        self.settings = settings
        self.device = resolve_device(settings.device)
        cls = import_class(source)
        kwargs = dict(settings.options)
        parameters = inspect.signature(cls).parameters
        if "device" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            kwargs["device"] = self.device
        self.instance = cls(**kwargs)
        version = settings.version or str(getattr(self.instance, "version", "") or "") or _source_digest(cls)
        self.identity = ModelIdentity(settings.name, version)
        self.contract: str
        self.wanted: tuple[str, ...]
        if callable(getattr(self.instance, "predict", None)):
            self.contract, self.wanted = "predict", ()
        elif callable(getattr(self.instance, "inference", None)):
            self.contract = "inference"
            self.wanted = tuple(
                name for name, p in inspect.signature(self.instance.inference).parameters.items()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            )
            unknown = [name for name in self.wanted if name not in NAMED_INPUTS]
            if unknown:
                raise TypeError(f"inference() asks for {unknown}, which pacsworker does not provide "
                                f"(known inputs: {', '.join(NAMED_INPUTS)})")
        else:
            raise TypeError(f"{source} has neither predict(series) nor inference(...)")

    def run(self, series: Series) -> ModelResult:
        with torch.inference_mode():
            if self.contract == "predict":
                raw = self.instance.predict(series)
            else:
                raw = self.instance.inference(**series.named_inputs(self.wanted))
        return to_result(raw, self.settings.outputs, series)


    def run_study(self, study: Study) -> tuple[Series, ModelResult]:
        """``predict(study)``; outputs are on the study's first series unless it returns ``(series, outputs)``."""
        if self.contract != "predict":
            raise ModelRunError("scope: study needs a class with predict(study); this one has inference(...)")
        with torch.inference_mode():
            raw = self.instance.predict(study)
        target = study.series[0]
        if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[0], Series):
            target, raw = raw
            if all(target is not series for series in study.series):
                raise ModelOutputError("predict(study) returned a series that is not one of the study's")
        return target, to_result(raw, self.settings.outputs, target)


def to_result(raw, outputs: dict[str, OutputConfig], series: Series) -> ModelResult:
    """Check and type what a model returned, as its ``outputs:`` configuration says.

    The configuration's coding applies to output objects as it does to plain values: a configured
    key's coded name, class meanings, box label meanings and segments replace the object's own.
    """
    notes: list[str] = []
    if isinstance(raw, ModelResult):
        raw, notes = dict(raw.outputs), list(raw.notes)
    elif isinstance(raw, OUTPUT_TYPES):
        raw = {next(iter(outputs)) if len(outputs) == 1 else "output": raw}
    elif not isinstance(raw, dict):
        if len(outputs) != 1:
            raise ModelOutputError(
                f"the model returned a {type(raw).__name__}; return a dict of named outputs, or configure exactly one output"
            )
        raw = {next(iter(outputs)): raw}
    result = ModelResult(notes=notes)
    for key, value in raw.items():
        if isinstance(value, Classification) and isinstance(value.value, (np.ndarray, np.generic, torch.Tensor)):
            value = replace(value, value=np.asarray(value.value).item())  # np.argmax(...) as a class: its number
        if isinstance(value, (*OUTPUT_TYPES, DicomObjects)):
            result.outputs[key] = configured(key, value, outputs.get(key))
        elif key in outputs:
            result.outputs[key] = _typed(key, value, outputs[key], series)
        else:
            log.info("model output %r is not in the model's outputs configuration; ignored", key)
    missing = [key for key in outputs if key not in result.outputs]
    if missing:
        raise ModelOutputError(f"output(s) {missing} configured but missing from what the model returned")
    for key, output in result.outputs.items():
        if not isinstance(output, DicomObjects):
            output.check(series.pixels.shape, key)
    return result


KINDS = {"labelmap": LabelMap, "probabilities": ProbabilityMaps, "score": Score, "classification": Classification,
         "boxes": Boxes}


def configured(key: str, output, config: OutputConfig | None):
    """An output object with its key's configured coding applied (the object's own where the
    configuration gives none).

    Raises
    ------
    ModelOutputError
        If the key is configured as another kind of output than the object is.
    """
    if config is None or isinstance(output, DicomObjects):
        return output
    if not isinstance(output, KINDS[config.kind]):
        raise ModelOutputError(
            f"output {key!r} is configured as {config.kind}, the model returned a {type(output).__name__}"
        )
    if isinstance(output, (Score, Classification)) and config.name is not None:
        output = replace(output, name=CodedTerm.from_triple(config.name))
    if isinstance(output, Classification) and str(output.value) in config.values:
        output = replace(output, meaning=CodedTerm.from_triple(config.values[str(output.value)]))
    if isinstance(output, Boxes) and config.values:
        output = Boxes(tuple(
            replace(box, finding=CodedTerm.from_triple(config.values[box.label])) if box.label in config.values else box
            for box in output.boxes
        ))
    if isinstance(output, (LabelMap, ProbabilityMaps)) and config.segments:
        specs = {spec.label: spec for spec in segments_of(config)}
        output = replace(output, segments=tuple(specs.get(spec.label, spec) for spec in output.segments))
    return output


def _series_value(key: str, value, series: Series):
    """Unwrap a value keyed by Series Instance UID (the named-input contract's convention)."""
    if isinstance(value, dict):
        if series.series_uid in value:
            return value[series.series_uid]
        if "value" in value:
            return value  # a classification with its score
        raise ModelOutputError(f"output {key!r} is a dict without the series {series.series_uid}")
    return value


def _typed(key: str, value, config: OutputConfig, series: Series):
    value = _series_value(key, value, series)
    if config.kind in ("labelmap", "probabilities"):
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        shape = series.pixels.shape
        if config.kind == "labelmap":
            if array.shape != shape:
                raise ModelOutputError(f"output {key!r}: label map of shape {array.shape}, the series is {shape}")
            if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
                raise ModelOutputError(f"output {key!r}: a label map must hold whole numbers")
            return LabelMap(array.astype(np.uint8), segments_of(config))
        if array.shape == shape and len(config.segments) == 1:
            array = array[np.newaxis]
        if array.shape != (len(config.segments), *shape):
            raise ModelOutputError(
                f"output {key!r}: probabilities of shape {array.shape}, expected {(len(config.segments), *shape)}"
            )
        if array.size and (float(array.min()) < 0 or float(array.max()) > 1):
            raise ModelOutputError(f"output {key!r}: probabilities must lie within 0..1")
        return ProbabilityMaps(array.astype(np.float32), segments_of(config))
    if config.kind == "boxes":
        return _boxes(key, value, config, series)
    name = CodedTerm.from_triple(config.name)
    if config.kind == "score":
        try:
            return Score(float(np.asarray(value).item()), name)
        except (TypeError, ValueError):
            raise ModelOutputError(f"output {key!r}: a score must be one number, got {type(value).__name__}") from None
    score = None
    if isinstance(value, dict):  # {"value": class, "score": 0.93}
        if "value" not in value:
            raise ModelOutputError(f"output {key!r}: a classification given as a dict needs 'value' (and may give 'score')")
        value, score = value["value"], value.get("score")
        try:
            score = None if score is None else float(np.asarray(score).item())
        except (TypeError, ValueError):
            raise ModelOutputError(f"output {key!r}: a classification's score must be one number") from None
    plain = np.asarray(value).item() if isinstance(value, (np.ndarray, np.generic, torch.Tensor)) else value
    if not isinstance(plain, (int, str, float)):
        raise ModelOutputError(f"output {key!r}: a class must be a number or a string, got {type(plain).__name__}")
    meaning = config.values.get(str(plain))
    # a float class is kept as the model gave it (Classification.check accepts it; the README's contract says int | str)
    return Classification(cast("int | str", plain), name, CodedTerm.from_triple(meaning) if meaning else None, score)


def _boxes(key: str, value, config: OutputConfig, series: Series) -> Boxes:
    """A list of ``{"slice", "top_left": [column, row], "bottom_right": [column, row], "label",
    "score"}`` (or :class:`Box` objects) as checked :class:`Boxes`; a label the configuration's
    ``values`` maps gets that coded meaning."""
    if isinstance(value, Boxes):
        value.check(series.pixels.shape, key)
        return value
    if not isinstance(value, (list, tuple)):
        raise ModelOutputError(f"output {key!r}: boxes must be a list, got {type(value).__name__}")
    boxes = []
    for number, item in enumerate(value, start=1):
        if isinstance(item, Box):
            meaning = config.values.get(item.label)
            boxes.append(replace(item, finding=CodedTerm.from_triple(meaning)) if meaning else item)
            continue
        if not isinstance(item, dict):
            raise ModelOutputError(f"output {key!r}: box {number} is a {type(item).__name__}, not a dict")
        try:
            label = str(item.get("label", "finding"))
            meaning = config.values.get(label)
            score = item.get("score")
            if "slice" in item and "slice_index" in item:
                raise ModelOutputError(f"output {key!r}: box {number} gives both 'slice' and 'slice_index'; give one")
            boxes.append(Box(
                slice=int(item["slice"] if "slice" in item or "slice_index" not in item else item["slice_index"]),
                # [column, row]: the corners' lengths are checked below, with a reason
                top_left=cast("tuple[float, float]", tuple(float(v) for v in item["top_left"])),
                bottom_right=cast("tuple[float, float]", tuple(float(v) for v in item["bottom_right"])),
                label=label,
                score=None if score is None else float(score),
                finding=CodedTerm.from_triple(meaning) if meaning else None,
            ))
        except KeyError as exc:
            raise ModelOutputError(f"output {key!r}: box {number} lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelOutputError(f"output {key!r}: box {number} is malformed ({exc})") from None
        if len(boxes[-1].top_left) != 2 or len(boxes[-1].bottom_right) != 2:
            raise ModelOutputError(f"output {key!r}: box {number} corners must be [column, row]")
    result = Boxes(tuple(boxes))
    result.check(series.pixels.shape, key)
    return result
