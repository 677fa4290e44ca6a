"""``kind: monai-bundle``: a MONAI bundle directory, read with MONAI's own bundle parser.

Network, preprocessing, inferer and postprocessing come from the bundle's
``configs/inference.json`` (or ``.yaml``); segment names from the channel definitions in
``configs/metadata.json``. The series is handed to the bundle's own preprocessing as the NIfTI
file its ``LoadImaged`` expects (written to a temporary folder), so the bundle runs exactly as
``python -m monai.bundle run`` would run it; transforms that save files are left out.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ...config import MonaiBundleModelSettings
from ..export import nifti_affine
from ..model_files import files_digest
from ..outputs import (
    ANATOMICAL_STRUCTURE,
    TISSUE,
    LabelMap,
    ModelIdentity,
    ModelOutputError,
    ModelResult,
    SegmentSpec,
)
from ..series import Series
from .python_class import resolve_device, segments_of


def _config_file(bundle: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        if (bundle / "configs" / name).is_file():
            return bundle / "configs" / name
    raise FileNotFoundError(f"{bundle}/configs has no inference.json or inference.yaml")


def segments_from_metadata(metadata: dict) -> tuple[SegmentSpec, ...]:
    """Labels >= 1 of the output's channel definition, e.g. ``{"0": "background", "1": "spleen"}``."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    channels = next((o.get("channel_def") for o in outputs.values() if o.get("channel_def")), None) or {}
    segments = []
    for label, name in sorted(((int(k), str(v)) for k, v in channels.items()), key=lambda item: item[0]):
        if label >= 1 and name.lower() != "background":
            segments.append(SegmentSpec(label, name[:1].upper() + name[1:], TISSUE, ANATOMICAL_STRUCTURE))
    return tuple(segments)


class MonaiBundleModel:
    """A bundle's network and transforms, parsed once."""

    def __init__(self, settings: MonaiBundleModelSettings):
        from monai.bundle import ConfigParser
        from monai.transforms import Compose

        self.settings = settings
        self.device = resolve_device(settings.device)
        bundle = Path(settings.source).expanduser().resolve()
        if not (bundle / "configs" / "metadata.json").is_file():
            raise FileNotFoundError(f"{bundle} is not a MONAI bundle (no configs/metadata.json)")
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
        parser = ConfigParser()
        parser.read_meta(str(bundle / "configs" / "metadata.json"))
        parser.read_config(str(_config_file(bundle)))
        parser["bundle_root"] = str(bundle)
        if "device" in parser:
            parser["device"] = f"$torch.device('{self.device}')"
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        post = parser.get_parsed_content("postprocessing")
        # files are pacsworker's business: the bundle's savers are left out
        kept = [t for t in getattr(post, "transforms", [post]) if not type(t).__name__.startswith("Save")]
        self.postprocessing = Compose(kept)
        self.network = self._network(parser, bundle).to(self.device).eval()
        if settings.outputs:
            key, config = next(iter(settings.outputs.items()))
            self.output_key, self.segments = key, segments_of(config)
        else:
            self.output_key, self.segments = "seg", segments_from_metadata(metadata)
        if not self.segments:
            raise ValueError("the bundle's metadata names no output channel (network_data_format.outputs.*.channel_def);"
                             " configure outputs: with the segments")
        # no version configured or in the metadata: the digest of the bundle's files, never a bare "0"
        version = settings.version or str(metadata.get("version") or "") or \
            "sha256:" + files_digest([Path(settings.source).expanduser()])[:12]
        self.identity = ModelIdentity(settings.name, version)

    def _network(self, parser, bundle: Path) -> torch.nn.Module:
        torchscript = bundle / "models" / "model.ts"
        if torchscript.is_file():
            return torch.jit.load(str(torchscript), map_location=self.device)
        if "network" in parser and not (bundle / "models" / "model.pt").is_file():
            return parser.get_parsed_content("network")
        network = parser.get_parsed_content("network_def")
        state = torch.load(bundle / "models" / "model.pt", map_location=self.device, weights_only=True)
        network.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        return network

    def run(self, series: Series) -> ModelResult:
        with tempfile.TemporaryDirectory(prefix="pacsworker-bundle-") as folder:
            path = Path(folder) / "image.nii.gz"
            nib.save(nib.Nifti1Image(np.ascontiguousarray(series.pixels.transpose(2, 1, 0)), nifti_affine(series)), path)
            with torch.inference_mode():
                data = self.preprocessing({"image": str(path)})
                data["pred"] = self.inferer(data["image"][None].to(self.device), self.network)[0].cpu()
                data = self.postprocessing(data)
        array = np.asarray(data["pred"].detach().cpu() if isinstance(data["pred"], torch.Tensor) else data["pred"])
        shape = series.pixels.shape
        grid = (shape[2], shape[1], shape[0])
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.shape != grid:
            raise ModelOutputError(f"output {self.output_key!r}: the bundle gave {array.shape}, expected {grid} "
                                   "(does its postprocessing invert the preprocessing and take the argmax?)")
        labels = np.rint(array.transpose(2, 1, 0)).astype(np.uint8)
        return ModelResult({self.output_key: LabelMap(np.ascontiguousarray(labels), self.segments)})
