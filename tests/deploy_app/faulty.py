"""A MONAI Deploy App SDK application that misbehaves as ``PACSWORKER_TEST_FAULT`` says, for the
tests of pacsworker's gate around applications (a single .py file: pacsworker runs its one
Application subclass):

- ``crash``: an operator raises, so the application exits non-zero;
- ``hang``: it starts a child process (its pid goes to ``PACSWORKER_TEST_PIDFILE``) and sleeps;
- ``foreign-study``: it writes a copy of an input image re-labelled into another study, and a note;
- ``default-model-info``: a threshold mask through the SDK's SEG writer with its default ModelInfo.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Image, Operator, OperatorSpec
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

FAULT = os.environ.get("PACSWORKER_TEST_FAULT", "crash")


class Misbehave(Operator):
    """Receives the loaded studies and does what ``FAULT`` names."""

    def __init__(self, fragment, *args, input_folder: Path, output_folder: Path, **kwargs):
        self.input_folder, self.output_folder = input_folder, output_folder
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("dicom_study_list")

    def compute(self, op_input, op_output, context):
        studies = op_input.receive("dicom_study_list")
        logging.info("faulty application: %d study(ies), fault %s", len(studies), FAULT)
        if FAULT == "crash":
            raise RuntimeError("the faulty application gives up: no spleen in this series")
        if FAULT == "hang":
            child = subprocess.Popen(["sleep", "300"])
            Path(os.environ["PACSWORKER_TEST_PIDFILE"]).write_text(str(child.pid))
            time.sleep(300)
        if FAULT == "foreign-study":
            ds = pydicom.dcmread(sorted(self.input_folder.iterdir())[0])
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            self.output_folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(self.output_folder / "copy.dcm")
            (self.output_folder / "notes").mkdir(exist_ok=True)
            (self.output_folder / "notes" / "summary.txt").write_text("one image, another study\n")


class Threshold(Operator):
    """Bone-dense voxels (> 300 HU) as label 1."""

    def setup(self, spec: OperatorSpec):
        spec.input("image")
        spec.output("seg_image")

    def compute(self, op_input, op_output, context):
        image = op_input.receive("image")
        op_output.emit(Image((image.asnumpy() > 300).astype(np.uint8), image.metadata()), "seg_image")


class FaultyApp(Application):
    def compose(self):
        context = Application.init_app_context(self.argv)
        input_folder, output_folder = Path(context.input_path), Path(context.output_path)
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder, name="loader")
        if FAULT != "default-model-info":
            misbehave = Misbehave(self, input_folder=input_folder, output_folder=output_folder, name="misbehave")
            self.add_flow(loader, misbehave, {("dicom_study_list", "dicom_study_list")})
            return
        selector = DICOMSeriesSelectorOperator(self, name="selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="to_volume")
        threshold = Threshold(self, name="threshold")
        bone = SegmentDescription(segment_label="Bone", segmented_property_category=codes.SCT.Tissue,
                                  segmented_property_type=codes.SCT.Bone, algorithm_name="threshold",
                                  algorithm_version="1")
        writer = DICOMSegmentationWriterOperator(self, segment_descriptions=[bone], output_folder=output_folder,
                                                 name="writer")  # default ModelInfo: empty Manufacturer
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, threshold, {("image", "image")})
        self.add_flow(threshold, writer, {("seg_image", "seg_image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})
