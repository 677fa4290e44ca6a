"""kind torchscript: the spleen UNet through a MONAI pipeline, voxel for voxel against MONAI run directly."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import REPO, dciodvfy_errors, pacsworker_run, write_config

SPLEEN = Path(REPO.parent / "shared" / "models" / "monai_spleen_unet_torchscript" / "model.ts")
CT02 = "ct02_philips_ingenuity_headphantom_5mm"
# the model authors' intensity window and crop (see the model's README), then the network's input size
PRE = [
    {"name": "ScaleIntensityRanged", "args": {"a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0, "clip": True}},
    {"name": "CropForegroundd", "args": {"source_key": "image"}},
]
POST = [
    {"name": "AsDiscreted", "args": {"argmax": True}},
    {"name": "KeepLargestConnectedComponentd", "args": {"applied_labels": [1]}},
]
PIPELINES = {
    # resampled to the network's spacing and back (the inverse of Spacingd lands on the series' grid)
    "resampled": ([{"name": "Spacingd", "args": {"pixdim": [1.5, 1.5, 2.5], "mode": "bilinear"}}],
                  {"name": "sliding_window", "roi_size": [96, 96, 48], "sw_batch_size": 2, "overlap": 0.25}),
    "whole-volume": ([{"name": "Resized", "args": {"spatial_size": [224, 224, 224]}}], {"name": "simple"}),
    "sliding-window": ([{"name": "Resized", "args": {"spatial_size": [160, 160, 128]}}],
                       {"name": "sliding_window", "roi_size": [96, 96, 96], "sw_batch_size": 2, "overlap": 0.25,
                        "mode": "gaussian"}),
}


def _direct(image_path: Path, resize: list[dict], inferer_config: dict) -> np.ndarray:
    """The same MONAI transforms, inferer and network, run here on MONAI's own reading of the image."""
    from monai.inferers import SimpleInferer, SlidingWindowInferer
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged
    import monai.transforms as mt

    load = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image")])
    pre = Compose([getattr(mt, s["name"])(keys=["image"], **s["args"]) for s in PRE + resize])
    post = Compose([getattr(mt, s["name"])(keys=["pred"], **s["args"]) for s in POST])
    args = {k: v for k, v in inferer_config.items() if k != "name"}
    inferer = SimpleInferer() if inferer_config["name"] == "simple" else SlidingWindowInferer(**args)
    network = torch.jit.load(str(SPLEEN), map_location="cpu").eval()
    with torch.inference_mode():
        data = pre(load({"image": str(image_path)}))
        data["pred"] = inferer(data["image"][None], network)[0]
        data = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
        data = post(data)
    return np.asarray(data["pred"])[0]


@pytest.mark.parametrize("variant", list(PIPELINES))
def test_spleen_unet_equals_monai_run_directly(dicom_dir, tmp_path, variant):
    if not SPLEEN.is_file():
        pytest.skip(f"{SPLEEN} absent")
    resize, inferer = PIPELINES[variant]
    config = write_config(
        tmp_path / "c.yaml",
        storage={"data_dir": str(tmp_path / "data")},
        models=[{
            "name": "spleen", "kind": "torchscript", "source": str(SPLEEN), "device": "cpu",
            "pipeline": {"pre": PRE + resize, "inferer": inferer, "post": POST},
            "outputs": {"seg": {"kind": "labelmap", "segments": [
                {"label": 1, "name": "Spleen", "category": ["SCT", "123037004", "Anatomical Structure"],
                 "type": ["SCT", "78961009", "Spleen"]}]}},
        }],
    )
    out = tmp_path / "out"
    result = pacsworker_run(dicom_dir / CT02, out, config, "spleen")
    assert result.returncode == 0, result.stderr[-3000:]
    ours = np.asarray(nib.load(out / "mask.nii.gz").dataobj)
    direct = _direct(out / "image.nii.gz", resize, inferer)
    assert ours.shape == direct.shape == (512, 512, 28)
    assert ours.sum() > 0, "the network should mark something for the comparison to mean anything"
    assert np.array_equal(ours, direct.astype(ours.dtype)), f"{int((ours != direct).sum())} voxels differ"
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "Spleen"
    assert int(seg.pixel_array.astype(bool).sum()) == int(ours.sum())
    assert dciodvfy_errors(out / "seg.dcm") == []
