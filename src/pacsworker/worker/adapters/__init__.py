"""One registry for every model kind: ``load_model(settings)`` returns a warm, callable model.

Each kind is a small module here; they all return a ``LoadedModel``: its identity (written into
the results) and ``run(series) -> ModelResult``.
"""

from __future__ import annotations

from typing import Protocol

from ...config import (
    ArterysModelSettings,
    BuiltinModelSettings,
    ModelSettings,
    MonaiBundleModelSettings,
    MonaiDeployModelSettings,
    NnunetModelSettings,
    PythonModelSettings,
    TorchscriptModelSettings,
    TritonModelSettings,
)
from ..outputs import ModelIdentity, ModelResult
from ..series import Series

BUILTIN = {
    "ct-body": "pacsworker.worker.ct_body:CtBodyModel",
    "mr-brain": "pacsworker.worker.mr_brain:MrBrainModel",
}


class LoadedModel(Protocol):
    device: str

    @property
    def identity(self) -> ModelIdentity:  # read-only: kind triton's names the version the server served
        ...

    def run(self, series: Series) -> ModelResult:
        ...


class ModelLoadError(RuntimeError):
    """A model could not be loaded; its jobs fail with this reason and the worker keeps serving."""


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load a model as its ``kind`` says.

    Raises
    ------
    ModelLoadError
        With the reason (unknown built-in, import error, constructor error, missing method).
    """
    from .python_class import PythonModel

    try:
        if isinstance(settings, BuiltinModelSettings):
            if settings.source not in BUILTIN:
                raise ModelLoadError(f"no built-in model named {settings.source!r} (known: {', '.join(BUILTIN)})")
            return PythonModel(settings, BUILTIN[settings.source])
        if isinstance(settings, PythonModelSettings):
            return PythonModel(settings, settings.source)
        if isinstance(settings, TorchscriptModelSettings):
            from .torchscript import TorchScriptModel

            return TorchScriptModel(settings)
        if isinstance(settings, MonaiBundleModelSettings):
            from .monai_bundle import MonaiBundleModel

            return MonaiBundleModel(settings)
        if isinstance(settings, TritonModelSettings):
            from .triton import TritonModel

            return TritonModel(settings)
        if isinstance(settings, ArterysModelSettings):
            from .arterys import ArterysModel

            return ArterysModel(settings)
        if isinstance(settings, MonaiDeployModelSettings):
            from .monai_deploy import MonaiDeployModel

            return MonaiDeployModel(settings)
        if isinstance(settings, NnunetModelSettings):
            from .nnunet import NnunetModel

            return NnunetModel(settings)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the researcher's code raised while loading
        where = getattr(settings, "source", None) or getattr(settings, "url", None) or getattr(settings, "command", "")
        raise ModelLoadError(f"model {settings.name} ({settings.kind} {where}) failed to load: "
                             f"{type(exc).__name__}: {exc}") from exc
    raise ModelLoadError(f"model kind {settings.kind!r} is not supported")
