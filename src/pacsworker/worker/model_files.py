"""The files a model computes with, and one digest of their bytes: new weights in the same file,
or an edited model class, give other result UIDs (and a reload of a warm model).

Which files, by ``kind``:

- ``builtin``, ``python``: the class's source file (``/path/file.py:Class``, or the module file
  of ``package.module:Class``); the files the class declares in a ``files`` attribute (paths
  relative to that source file's folder, or absolute; a folder counts with every file in it);
  and every ``options`` value that names an existing file (weights passed by path).
- ``torchscript``: the TorchScript file, and the pipeline's YAML file when it is one.
- ``monai-bundle``: every file of the bundle folder.
- ``monai-deploy``: the application (its ``.py`` file, or every file of its folder) and
  ``model_path`` (a file or every file of a folder). A packaged MAP (``command``) is named by
  its command alone, which the settings' fingerprint covers.
- ``nnunet``: dataset.json, plans.json and the checkpoint of each fold it runs.
- ``triton``, ``arterys``: none here; the server's model is named by the settings.

Each file's digest is kept per process by (path, size, mtime_ns): a job costs one ``stat`` per
file, and a GB weight file is hashed once, not per job.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_SKIPPED_PARTS = {"__pycache__", ".git"}
_cache: dict[tuple[str, int, int], str] = {}
_cache_lock = threading.Lock()


def _class_source_file(source: str) -> Path | None:
    """The file that defines ``package.module:Class`` or ``/path/file.py:Class``, found without importing it."""
    module, _, _ = source.rpartition(":")
    if not module:
        return None
    if module.endswith(".py"):
        return Path(module).expanduser().resolve()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec is not None and spec.origin not in (None, "built-in", "frozen") else None


def model_files(settings, loaded=None) -> list[Path]:
    """The files whose bytes decide what the model computes (see the module's text), in a fixed order.

    ``loaded`` is the loaded model, whose class may declare more files in ``files``.
    """
    from .adapters import BUILTIN

    kind = getattr(settings, "kind", "")
    source = str(getattr(settings, "source", "") or "")
    found: list[Path] = []
    if kind in ("builtin", "python"):
        source_file = _class_source_file(BUILTIN.get(source, "") if kind == "builtin" else source)
        if source_file is not None:
            found.append(source_file)
        instance = getattr(loaded, "instance", None)
        base = source_file.parent if source_file is not None else Path.cwd()
        declared = getattr(instance, "files", None) or ()
        found += [base / Path(name).expanduser() for name in ([declared] if isinstance(declared, str) else declared)]
        for value in (getattr(settings, "options", None) or {}).values():
            if isinstance(value, str) and value and len(value) < 4096 and Path(value).expanduser().is_file():
                found.append(Path(value).expanduser())
    elif kind == "torchscript":
        found.append(Path(source).expanduser())
        pipeline = getattr(settings, "pipeline", None)
        if isinstance(pipeline, str):
            path = Path(pipeline).expanduser()
            found.append(path if path.is_absolute() else Path(source).parent / path)
    elif kind == "monai-bundle":
        found.append(Path(source).expanduser())
    elif kind == "nnunet":
        from .adapters.nnunet import trained_model_files

        found += trained_model_files(settings)
    elif kind == "monai-deploy":
        if source and not getattr(settings, "command", None):
            found.append(Path(source).expanduser())
        if getattr(settings, "model_path", None):
            found.append(Path(settings.model_path).expanduser())
    return [path.resolve() for path in found]


def _expanded(paths: Iterable[Path]) -> list[tuple[str, Path | None]]:
    """(name, file) of every file, folders opened (sorted, caches skipped); a missing path as (name, None)."""
    files: list[tuple[str, Path | None]] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and not _SKIPPED_PARTS & set(p.relative_to(path).parts)
                            and p.suffix != ".pyc")
            files += [(f"{path.name}/{p.relative_to(path).as_posix()}", p) for p in inside]
        elif path.is_file():
            files.append((path.name, path))
        else:
            files.append((path.name, None))
    return files


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, computed once per (path, size, mtime_ns) in this process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        known = _cache.get(key)
    if known is not None:
        return known
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    with _cache_lock:
        _cache[key] = digest
    return digest


def files_digest(paths: Iterable[Path]) -> str:
    """One digest of the files' names (folders' relative paths) and bytes; a missing file counts as missing."""
    lines = []
    for name, path in _expanded(paths):
        if path is None:
            log.warning("model file %s does not exist; its digest counts it as missing", name)
        lines.append(f"{name}\t{file_digest(path) if path is not None else 'missing'}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def job_fingerprint(settings) -> str:
    """What names a model in its job ids: the settings' fingerprint and, where this process sees the
    model's files, their digest, so that new weights in the same file make a new job (and a re-run
    when the same series is sent again). A receiver on a host without the model's files names the
    model by its settings alone."""
    paths = model_files(settings)
    if not paths or not any(path.exists() for path in paths):
        return settings.fingerprint()
    return f"{settings.fingerprint()}{files_digest(paths)[:8]}"
