"""kind monai-bundle: a bundle around the spleen TorchScript model, against `python -m monai.bundle run`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import dciodvfy_errors, pacsworker_run, write_config
from test_torchscript import CT02, SPLEEN

INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/nonexistent",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "device": "$torch.device('cpu')",
    "network": "$torch.jit.load(@bundle_root + '/models/model.ts')",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0,
         "clip": True},
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"},
        {"_target_": "Resized", "keys": "image", "spatial_size": [160, 160, 128]},
    ]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 2, "overlap": 0.25},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "resample": False, "separate_folder": False, "output_dtype": "$np.uint8"},
    ]},
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing"},
    "run": ["$@evaluator.run()"],
}
METADATA = {
    "version": "0.1.0", "monai_version": "1.6.1",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                             "channel_def": {"0": "background", "1": "spleen"}}},
    },
}


@pytest.fixture
def bundle(tmp_path) -> Path:
    if not SPLEEN.is_file():
        pytest.skip(f"{SPLEEN} absent")
    root = tmp_path / "spleen_bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copy(SPLEEN, root / "models" / "model.ts")
    (root / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=1))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=1))
    return root


def test_bundle_equals_monai_bundle_run(dicom_dir, tmp_path, bundle):
    config = write_config(
        tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")},
        models=[{"name": "spleen-bundle", "kind": "monai-bundle", "source": str(bundle), "device": "cpu"}],
    )
    out = tmp_path / "out"
    ours = pacsworker_run(dicom_dir / CT02, out, config, "spleen-bundle")
    assert ours.returncode == 0, ours.stderr[-3000:]
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    shutil.copy(out / "image.nii.gz", dataset / "image.nii.gz")  # the same input, as a NIfTI for the bundle
    theirs = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
         "--dataset_dir", str(dataset)],
        capture_output=True, text=True, timeout=600,
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    reference = np.squeeze(np.asarray(nib.load(bundle / "eval" / "image_seg.nii.gz").dataobj))
    mask = np.asarray(nib.load(out / "mask.nii.gz").dataobj)
    assert mask.shape == reference.shape == (512, 512, 28)
    assert mask.sum() > 0
    assert np.array_equal(mask, reference.astype(mask.dtype)), f"{int((mask != reference).sum())} voxels differ"
    seg = pydicom.dcmread(out / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]  # from the metadata's channel_def
    assert dciodvfy_errors(out / "seg.dcm") == []
