"""``kind: monai-deploy``: a MONAI Deploy App SDK application, or a packaged one (MAP), as a model.

Such an application reads a folder of DICOM files and writes its own DICOM objects (SEG, SR, ...),
so it is run as a subprocess on the series' files rather than called on a volume:

- ``source``: the application, a ``.py`` file or a folder. A folder with ``__main__.py`` (the SDK's
  application layout, what a MAP runs) is run as ``python -u FOLDER``; a ``.py`` file, or a package
  folder without ``__main__.py``, is imported and its one ``holoscan.core.Application`` subclass run.
- ``command``: instead of ``source``, a command template for a packaged MAP, e.g. ``docker run ...``
  with ``{input}``, ``{output}`` and ``{model}`` standing for the run's folders and ``model_path``.

Either way the run gets the SDK's standard environment: ``HOLOSCAN_INPUT_PATH`` (the series' files,
hard links or copies of the spooled instances), ``HOLOSCAN_OUTPUT_PATH`` (an empty folder),
``HOLOSCAN_MODEL_PATH`` (``model_path``, when set) and ``HOLOSCAN_WORKDIR``. Options:
``timeout_seconds`` (default 1500, below the job's default soft limit of 1800 s), ``env`` (more
environment variables) and ``python`` (the interpreter for ``source``; default: pacsworker's).

Every Part 10 file the application wrote becomes a result object (``DicomObjects``), checked by the
validation gate like pacsworker's own; other files and the application's log are kept, not sent.
Its SEGs are also decoded into label maps, so that plausibility checks and reference cases apply.
The application makes its own UIDs: they are not pacsworker's deterministic ones.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from ...config import MonaiDeployModelSettings
from ..outputs import (
    CodedTerm,
    DicomObjects,
    LabelMap,
    ModelIdentity,
    ModelOutput,
    ModelResult,
    ModelRunError,
    SegmentSpec,
)
from ..series import Series
from . import ModelLoadError

log = logging.getLogger("pacsworker.worker")

DEFAULT_TIMEOUT_SECONDS = 1500.0
LOG_TAIL_LINES = 15
LOG_TAIL_CHARS = 3000
PLACEHOLDERS = ("input", "output", "model")
STACK_BYTES = 32 * 1024 * 1024  # Holoscan warns below this stack size limit
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

# Runs a .py file's or a package's one Application subclass; ``-c`` keeps pacsworker out of the child.
LAUNCHER = r"""
import importlib, importlib.util, sys
from pathlib import Path
source = Path(sys.argv[1]).resolve()
sys.argv = [str(source)]
sys.path.insert(0, str(source.parent))
from holoscan.core import Application
if source.is_dir():
    modules = [importlib.import_module(source.name)]
    if (source / "app.py").is_file():
        modules.append(importlib.import_module(source.name + ".app"))
    package = source.name
else:
    spec = importlib.util.spec_from_file_location("pacsworker_monai_deploy_app", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    modules, package = [module], spec.name
found = sorted({cls for m in modules for cls in vars(m).values()
                if isinstance(cls, type) and issubclass(cls, Application) and cls is not Application
                and cls.__module__.split(".")[0] == package}, key=lambda cls: cls.__name__)
if len(found) != 1:
    names = ", ".join(cls.__name__ for cls in found) or "none"
    sys.exit(f"pacsworker: {source} must define exactly one holoscan Application subclass (found: {names})")
found[0]().run()
"""


class ApplicationError(ModelRunError):
    """The application exited non-zero or ran past its time limit; ``log`` holds what it printed."""

    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


def log_tail(text: str, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    """The last non-empty lines of a log, at most ``chars`` characters."""
    tail = "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
    return tail[-chars:]


class MonaiDeployModel:
    """A MONAI Deploy application, checked at load and run once per series as a subprocess."""

    def __init__(self, settings: MonaiDeployModelSettings):
        self.settings = settings
        options = dict(settings.options)
        self.timeout = float(options.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS))
        if self.timeout <= 0:
            raise ModelLoadError(f"model {settings.name}: options.timeout_seconds must be positive")
        self.extra_env = {str(k): str(v) for k, v in (options.get("env") or {}).items()}
        self.model_path = Path(settings.model_path).expanduser().resolve() if settings.model_path else None
        if self.model_path is not None and not self.model_path.exists():
            raise ModelLoadError(f"model {settings.name}: model_path {self.model_path} does not exist")
        self.device = settings.device
        self.template: list[str] | None
        if settings.command is not None:  # an empty command is refused by _parse_template, with the reason
            self.template = self._parse_template(settings.command)
            # a packaged application names no version here: its command (image and tag) stands for it
            version = settings.version or "command:" + hashlib.sha256(settings.command.encode()).hexdigest()[:12]
        else:
            if settings.source is None:  # the settings' validator asks for source or command
                raise ModelLoadError(f"model {settings.name}: kind monai-deploy needs source or command")
            self.template = None
            self.source = Path(settings.source).expanduser().resolve()
            self.python = str(options.get("python") or sys.executable)
            self.argv = self._source_argv()
            version = settings.version or self._sdk_version()
        self.identity = ModelIdentity(settings.name, version)

    def _parse_template(self, command: str) -> list[str]:
        try:
            tokens = shlex.split(command)
            fields = {name for token in tokens for _, name, _, _ in string.Formatter().parse(token) if name is not None}
        except ValueError as exc:
            raise ModelLoadError(f"model {self.settings.name}: command {command!r} cannot be parsed: {exc}") from exc
        unknown = sorted(fields - set(PLACEHOLDERS))
        if unknown:
            raise ModelLoadError(f"model {self.settings.name}: command names {{{unknown[0]}}}; known placeholders: "
                                 + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS) + " (write other braces twice)")
        if "model" in fields and self.model_path is None:
            raise ModelLoadError(f"model {self.settings.name}: command uses {{model}} but model_path is not set")
        program = tokens[0] if tokens else ""
        if not program or shutil.which(program) is None:
            raise ModelLoadError(f"model {self.settings.name}: command {program or '(empty)'!r} not found")
        return tokens

    def _source_argv(self) -> list[str]:
        source = self.source
        if source.is_dir() and (source / "__main__.py").is_file():
            return [self.python, "-u", str(source)]
        if (source.is_file() and source.suffix == ".py") or (source.is_dir() and (source / "__init__.py").is_file()):
            return [self.python, "-u", "-c", LAUNCHER, str(source)]
        raise ModelLoadError(f"model {self.settings.name}: source {source} is neither a .py file nor an application "
                             "folder (with __main__.py or __init__.py)")

    def _sdk_version(self) -> str:
        if self.python != sys.executable:
            return "0"  # the SDK lives in the application's own environment
        try:
            return importlib.metadata.version("monai-deploy-app-sdk")
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"model {self.settings.name}: monai-deploy-app-sdk is not installed in {sys.prefix} "
                "(pip install monai-deploy-app-sdk, or set options.python to an interpreter that has it)"
            ) from None

    def _environment(self, input_dir: Path, output_dir: Path, work_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HOLOSCAN_INPUT_PATH=str(input_dir), HOLOSCAN_OUTPUT_PATH=str(output_dir),
                   HOLOSCAN_WORKDIR=str(work_dir), PYTHONUNBUFFERED="1")
        if self.model_path is not None:
            env["HOLOSCAN_MODEL_PATH"] = str(self.model_path)
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif self.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = self.device.split(":", 1)[1]
        env.update(self.extra_env)
        return env

    def command_for(self, input_dir: Path, output_dir: Path) -> list[str]:
        """The argv of one run: the template with its placeholders filled, or the source's launcher."""
        if self.template is None:
            # Holoscan's recommended stack size, where the hard limit allows it (no preexec_fn: threads)
            return ["/bin/sh", "-c", f'ulimit -s {STACK_BYTES // 1024} 2>/dev/null; exec "$@"', "sh", *self.argv]
        values = {"input": str(input_dir), "output": str(output_dir), "model": str(self.model_path or "")}
        return [token.format(**values) for token in self.template]

    def run(self, series: Series) -> ModelResult:
        files = series.source_files()
        with tempfile.TemporaryDirectory(prefix="pacsworker-monai-deploy-") as folder:
            run_dir = Path(folder)
            input_dir, output_dir, work_dir = run_dir / "input", run_dir / "output", run_dir / "work"
            for path in (input_dir, output_dir, work_dir):
                path.mkdir()
            _place_inputs(files, input_dir)
            log_path = run_dir / "app.log"
            started = time.perf_counter()
            returncode = self._execute(self.command_for(input_dir, output_dir),
                                       self._environment(input_dir, output_dir, work_dir), run_dir, log_path)
            text = log_path.read_text(errors="replace")
            if returncode != 0:
                how = (f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 and -returncode in
                       signal.valid_signals() else f"exited with status {returncode}")
                raise ApplicationError(
                    f"application {self.settings.name} {how}; its last lines:\n{log_tail(text)}", text)
            try:
                datasets, others = _collect_outputs(output_dir)
            except ValueError as exc:
                raise ApplicationError(f"application {self.settings.name} wrote {exc}", text) from exc
            log.info("model %s: application wrote %d DICOM object(s) and %d other file(s) in %.1f s",
                     self.settings.name, len(datasets), len(others), time.perf_counter() - started)
        outputs: dict[str, ModelOutput] = {"application": DicomObjects(tuple(datasets), others, text),
                                           **_label_maps(datasets, series)}
        return ModelResult(outputs=outputs)

    def _execute(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> int:
        """Run to the end or to the time limit; whatever interrupts the wait (the time limit, the job's
        soft limit, a worker shutdown) kills the application's whole process group."""
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    cwd=cwd, env=env, start_new_session=True)
            try:
                returncode = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                text = log_path.read_text(errors="replace")
                raise ApplicationError(
                    f"application {self.settings.name} ran past its time limit of {self.timeout:g} s "
                    f"(options.timeout_seconds) and was stopped with its process group; its last lines:\n"
                    f"{log_tail(text)}", text) from None
            except BaseException:
                _kill_group(proc)
                raise
            _kill_group(proc)  # nothing it started outlives the run
        return returncode


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _term(item) -> CodedTerm:
    return CodedTerm(scheme=str(item.CodingSchemeDesignator), value=str(item.CodeValue), meaning=str(item.CodeMeaning))


def _label_maps(datasets: list[pydicom.Dataset], series: Series) -> dict[str, LabelMap]:
    """Each SEG the application wrote as a label map on the series' grid, so that plausibility
    checks, reference cases and ``pacsworker run``'s previews see its segments. A SEG that does not
    decode onto the series (overlapping segments, foreign references) gives none; the validation
    gate says why it must not be sent."""
    import highdicom as hd

    if any(source.frame_number is not None for source in series.volume.sources):
        return {}  # multi-frame sources: frames, not instances, are the slices
    uids = [str(source.dataset.SOPInstanceUID) for source in series.volume.sources]
    maps: dict[str, LabelMap] = {}
    for ds in datasets:
        if str(ds.get("SOPClassUID", "")) != SEG_CLASS:
            continue
        try:
            seg = hd.seg.Segmentation.from_dataset(ds, copy=True)
            labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
            segments = tuple(SegmentSpec(
                label=int(item.SegmentNumber), name=str(item.SegmentLabel),
                category=_term(item.SegmentedPropertyCategoryCodeSequence[0]),
                property_type=_term(item.SegmentedPropertyTypeCodeSequence[0]),
            ) for item in ds.SegmentSequence)
        except Exception as exc:  # noqa: BLE001 - highdicom's reasons vary; the gate has the final word
            log.info("application SEG %s does not decode onto the series: %s", ds.get("SOPInstanceUID"), exc)
            continue
        maps[f"seg-{len(maps) + 1}"] = LabelMap(np.asarray(labels, dtype=np.uint16), segments)
    return maps


def _place_inputs(files: list[Path], input_dir: Path) -> None:
    """Hard links of the series' files (copies across file systems); never symlinks, which a
    container would not resolve."""
    for number, path in enumerate(files, start=1):
        target = input_dir / f"{number:05d}-{Path(path).name}"
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)


def _is_part10(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _collect_outputs(output_dir: Path) -> tuple[list[pydicom.Dataset], dict[str, bytes]]:
    """Every DICOM Part 10 file in the output folder as a dataset; everything else by relative path.

    Raises
    ------
    ValueError
        For a Part 10 file that does not parse (the message names it).
    """
    datasets: list[pydicom.Dataset] = []
    others: dict[str, bytes] = {}
    for path in sorted(p for p in output_dir.rglob("*") if p.is_file()):
        name = path.relative_to(output_dir).as_posix()
        if not _is_part10(path):
            others[name] = path.read_bytes()
            continue
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a broken file
            raise ValueError(f"{name} is a DICOM file that does not parse: {type(exc).__name__}: {exc}") from exc
    return datasets, others
