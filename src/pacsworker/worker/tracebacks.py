"""What a model's own code raised, where: the traceback kept in the job record and logged, and the
file and line named in the job's reason. pacsworker's frames that only called the model (the
runtime, the adapters, the import machinery) are left out.
"""

from __future__ import annotations

import sysconfig
import traceback
from pathlib import Path

_WORKER = Path(__file__).resolve().parent
_CALLERS = (_WORKER / "runtime.py", _WORKER / "adapters")  # pacsworker's code that calls into a model
_LIBRARIES = tuple(Path(p).resolve() for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                                                sysconfig.get_paths()["platlib"]})


def _is_caller(filename: str) -> bool:
    if filename.startswith("<frozen"):
        return True
    path = Path(filename).resolve()
    return any(path == caller or path.is_relative_to(caller) for caller in _CALLERS)


def _is_library(filename: str) -> bool:
    path = Path(filename).resolve()
    return filename.startswith("<") or any(path.is_relative_to(root) for root in _LIBRARIES)


def _model_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    """The frames of ``exc``'s traceback from the first one that is not pacsworker calling the model."""
    frames = list(traceback.extract_tb(exc.__traceback__))
    start = 0
    while start < len(frames) - 1 and _is_caller(frames[start].filename):
        start += 1
    return frames[start:]


def model_traceback(exc: BaseException) -> str:
    """``exc``'s traceback (and its causes'), starting at the model's own code; '' without one."""
    if exc.__traceback__ is None:
        return ""
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list(_model_frames(exc))
    return "".join(summary.format()).rstrip("\n")


def raised_at(exc: BaseException) -> str:
    """``file.py, line N``: the innermost frame of the model's own code (not a library's) that raised."""
    frames = _model_frames(exc)
    own = [frame for frame in frames if not _is_library(frame.filename)] or frames
    if not own:
        return ""
    return f"{Path(own[-1].filename).name}, line {own[-1].lineno}"


def load_traceback(exc: BaseException) -> str:
    """The traceback of what made a model fail to load, when it is worth reading: raised by the
    model's code or a library it called, not by an adapter that already says why in words."""
    cause = exc.__cause__
    if cause is None or cause.__traceback__ is None:
        return ""
    innermost = traceback.extract_tb(cause.__traceback__)[-1].filename
    return "" if _is_caller(innermost) else model_traceback(cause)
