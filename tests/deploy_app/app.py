"""A MONAI Deploy App SDK application for the tests: the spleen TorchScript UNet on a CT series,
written as the SDK's own operators chain it: DICOM loader -> series selector (CT) -> volume ->
MONAI sliding-window inference -> the SDK's DICOM SEG writer.

Input, output and model come from the App SDK's standard environment (HOLOSCAN_INPUT_PATH,
HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH) or its -i/-o/-m arguments. The transforms are the ones
tests/test_torchscript.py gives pacsworker's torchscript adapter ("resampled"), so both masks
can be compared.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.dicom_utils import ModelInfo
from monai.deploy.operators.monai_seg_inference_operator import InMemImageReader, MonaiSegInferenceOperator
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    Invertd,
    KeepLargestConnectedComponentd,
    LoadImaged,
    ScaleIntensityRanged,
    Spacingd,
)
from pydicom.sr.codedict import codes

CT_ONLY = json.dumps({"selections": [{"name": "CT", "conditions": {"Modality": "(?i)^CT$"}}]})
ALGORITHM = ("pacsworker-test-spleen", "1.0")
# the SEG writer's default ModelInfo leaves Manufacturer (Type 1) of the Contributing Equipment
# Sequence empty, which dciodvfy reports as an error: an application names its creator
MODEL_INFO = ModelInfo(creator="pacsworker tests", name=ALGORITHM[0], version=ALGORITHM[1],
                       uid="2.25.160129775426375838766718297315329335711")


class SpleenInference(MonaiSegInferenceOperator):
    """Sliding-window inference whose transforms need the image reader only known at compute time."""

    def pre_process(self, reader: InMemImageReader, *args, **kwargs) -> Compose:
        return Compose([
            LoadImaged(keys="image", reader=reader),
            EnsureChannelFirstd(keys="image"),
            ScaleIntensityRanged(keys="image", a_min=-57, a_max=164, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys="image", source_key="image"),
            Spacingd(keys="image", pixdim=[1.5, 1.5, 2.5], mode="bilinear"),
        ])

    def post_process(self, pre: Compose, *args, **kwargs) -> Compose:
        # back onto the series' grid first, then the label: as pacsworker's torchscript adapter does
        return Compose([
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted(keys="pred", argmax=True),
            KeepLargestConnectedComponentd(keys="pred", applied_labels=[1]),
        ])


class SpleenSegApp(Application):
    """CT series in, one DICOM SEG (Spleen) out."""

    def compose(self):
        context = Application.init_app_context(self.argv)
        logging.info("input %s, output %s, model %s", context.input_path, context.output_path, context.model_path)
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=Path(context.input_path),
                                         name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=CT_ONLY, name="ct_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        inference = SpleenInference(
            self, roi_size=(96, 96, 48), overlap=0.25, sw_batch_size=2, pre_transforms=None, post_transforms=None,
            app_context=context, model_path=Path(context.model_path), name="spleen_inference",
        )
        spleen = SegmentDescription(
            segment_label="Spleen", segmented_property_category=codes.SCT.Organ,
            segmented_property_type=codes.SCT.Spleen, algorithm_name=ALGORITHM[0], algorithm_version=ALGORITHM[1],
        )
        writer = DICOMSegmentationWriterOperator(self, segment_descriptions=[spleen],
                                                 output_folder=Path(context.output_path), model_info=MODEL_INFO,
                                                 name="seg_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, inference, {("image", "image")})
        self.add_flow(inference, writer, {("seg_image", "seg_image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})
