"""``kind: torchscript``: a TorchScript file run through a MONAI pipeline named in the configuration.

What NVIDIA's Clara base inference operator read from ``config_inference.json``: pre-transforms,
an inferer (whole volume, or sliding window), post-transforms, by MONAI names and arguments.
The image reaches the pipeline as MONAI's loaders give a NIfTI: a channel-first ``MetaTensor``
(1, columns, rows, slices) in modality units with its RAS affine, under the key ``image``; the
network's output goes back through the inverse of the pre-transforms (``Invertd``) before the
post-transforms, so the label map lands on the series' own grid.

``PipelineModel`` is that pipeline around any network callable; ``kind: triton`` (``triton.py``)
runs the same pipeline here with a network served by Triton.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from ...config import PipelineConfig, TorchscriptModelSettings, TransformConfig, TritonModelSettings
from ..export import nifti_affine
from ..outputs import (
    LabelMap,
    ModelIdentity,
    ModelOutputError,
    ModelResult,
    ProbabilityMaps,
)
from ..series import Series
from .python_class import file_digest, resolve_device, segments_of

log = logging.getLogger("pacsworker.worker")


def load_pipeline(settings: TorchscriptModelSettings | TritonModelSettings) -> PipelineConfig:
    """The model's pipeline: inline, or a YAML file (relative to the model file)."""
    pipeline = settings.pipeline
    if isinstance(pipeline, str):
        path = Path(pipeline)
        if not path.is_absolute():
            if not isinstance(settings, TorchscriptModelSettings):  # kind triton's settings refuse it already
                raise ValueError(f"kind {settings.kind}: pipeline file {pipeline!r} must be named by its absolute path")
            path = Path(settings.source).parent / path
        pipeline = PipelineConfig.model_validate(yaml.safe_load(path.read_text()))
    if pipeline is None:
        raise ValueError(f"kind {settings.kind} needs a pipeline (pre, inferer, post)")
    return pipeline


def build_transform(step: TransformConfig, key: str):
    """A MONAI dictionary transform by name; ``keys`` defaults to the pipeline's key."""
    import monai.transforms

    cls = getattr(monai.transforms, step.name, None)
    if cls is None:
        raise ValueError(f"MONAI has no transform named {step.name!r}")
    args = dict(step.args)
    if "keys" in inspect.signature(cls).parameters and "keys" not in args:
        args["keys"] = [key]
    return cls(**args)


def build_inferer(config: dict):
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    args = dict(config)
    name = args.pop("name", "simple")
    if name == "simple":
        return SimpleInferer()
    if name == "sliding_window":
        return SlidingWindowInferer(**args)
    raise ValueError(f"inferer {name!r} is not supported (simple, sliding_window)")


def image_for_pipeline(series: Series):
    """The series as MONAI's NIfTI loading gives it: (1, columns, rows, slices) with a RAS affine."""
    from monai.data import MetaTensor

    array = np.ascontiguousarray(series.pixels.transpose(2, 1, 0), dtype=np.float32)[np.newaxis]
    return MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(nifti_affine(series)))


def channels_innermost(tensor: torch.Tensor) -> torch.Tensor:
    """The same (channels, ...) tensor with the channels adjacent in memory: per-voxel reductions
    over channels (argmax, softmax) then read contiguous memory; torch's CPU argmax over a leading
    dimension is several times slower."""
    if not isinstance(tensor, torch.Tensor) or tensor.ndim < 2 or tensor.shape[0] < 2:
        return tensor
    return tensor.movedim(0, -1).contiguous().movedim(-1, 0)


class PipelineModel:
    """A network inside its MONAI pipeline (pre-transforms, inferer, inverse, post-transforms).

    Subclasses say where the network is: ``_load_network()`` returns a callable that maps a batch
    of images (or of sliding-window tiles), (N, C, ...), to the network's output (N, channels, ...).
    """

    settings: TorchscriptModelSettings | TritonModelSettings

    def __init__(self, settings: TorchscriptModelSettings | TritonModelSettings):
        from monai.transforms import Compose, Invertd

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.network = self._load_network()
        self.pipeline = load_pipeline(settings)
        key = "image"
        self.pre = Compose([build_transform(step, key) for step in self.pipeline.pre])
        self.invert = Invertd(keys="pred", transform=self.pre, orig_keys=key, nearest_interp=False)
        self.post = Compose([build_transform(step, "pred") for step in self.pipeline.post])
        self.inferer = build_inferer(self.pipeline.inferer)
        if len(settings.outputs) != 1:
            raise ValueError(f"kind {settings.kind} needs exactly one output (labelmap or probabilities) in outputs:")
        self.output_key, self.output = next(iter(settings.outputs.items()))
        self.notes: list[str] = []

    def _load_network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The inferer over a (1, C, ...) batch on the model's device, with AMP on CUDA if asked."""
        batch = image.to(self.device)
        autocast = self.device.startswith("cuda") and self.pipeline.amp
        with torch.autocast("cuda", enabled=autocast):
            return self.inferer(batch, self.network)

    def _forward_with_fallback(self, image: torch.Tensor) -> torch.Tensor:
        try:
            return self.forward(image)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if getattr(self.inferer, "sw_batch_size", 1) > 1:
                self.inferer.sw_batch_size = 1
                self.notes.append("CUDA out of memory: sliding-window batch reduced to 1")
                try:
                    return self.forward(image)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
            self.notes.append("CUDA out of memory: ran on the CPU")
            log.warning("model %s: CUDA out of memory; this job runs on the CPU", self.settings.name)
            network = self.network.cpu() if isinstance(self.network, torch.nn.Module) else self.network
            return self.inferer(image.cpu(), network).to("cpu")

    def run(self, series: Series) -> ModelResult:
        with torch.inference_mode():
            data = self.pre({"image": image_for_pipeline(series)})
            prediction = self._forward_with_fallback(data["image"][None])[0].cpu()
            data["pred"] = prediction
            data = self.invert(data)
            data["pred"] = channels_innermost(data["pred"])
            data = self.post(data)
        pred = data["pred"]
        array = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred)
        volume_shape = series.pixels.shape
        grid = (volume_shape[2], volume_shape[1], volume_shape[0])
        if array.ndim != 4 or tuple(array.shape[1:]) != grid:
            raise ModelOutputError(
                f"output {self.output_key!r}: the pipeline gave {tuple(array.shape)}, expected (channels, *{grid}) "
                "on the series' grid (does the pipeline end with a label or probability map?)"
            )
        array = array.transpose(0, 3, 2, 1)  # back to (channels, slices, rows, columns)
        segments = segments_of(self.output)
        result: LabelMap | ProbabilityMaps
        if self.output.kind == "labelmap":
            if array.shape[0] != 1:
                raise ModelOutputError(f"output {self.output_key!r}: a label map needs one channel, got {array.shape[0]} "
                                       "(add AsDiscreted with argmax to post)")
            result = LabelMap(np.rint(array[0]).astype(np.uint8), segments)
        else:
            channels = array[[s.label for s in self.output.segments]] if array.shape[0] > len(segments) else array
            result = ProbabilityMaps(np.clip(channels, 0, 1).astype(np.float32), segments)
        outcome = ModelResult({self.output_key: result})
        outcome.notes, self.notes = list(self.notes), []
        return outcome


class TorchScriptModel(PipelineModel):
    """A TorchScript network with its MONAI pipeline, loaded once and kept on its device."""

    settings: TorchscriptModelSettings

    def __init__(self, settings: TorchscriptModelSettings):
        super().__init__(settings)
        # no version configured: the file's digest (its name, often "model", says nothing)
        self.identity = ModelIdentity(settings.name, settings.version or file_digest(Path(settings.source).expanduser()))

    def _load_network(self) -> torch.jit.ScriptModule:
        path = Path(self.settings.source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript file {path} does not exist")
        return torch.jit.load(str(path), map_location=self.device).eval()
