"""``kind: nnunet``: an nnU-Net v2 trained-model folder, run by nnU-Net's own ``nnUNetPredictor``.

nnU-Net's preprocessing, resampling, sliding window, mirroring and ensembling all run as they
run in ``nnUNetv2_predict``; pacsworker only hands the predictor the series in memory. What it
hands over is what ``nnUNetv2_predict`` would read from a NIfTI of the series as dcm2niix writes
it, with the reader the model was planned with (``image_reader_writer`` in plans.json), so the
label map equals the command line tool's, voxel for voxel:

- dcm2niix keeps columns and slices in DICOM order and reverses the rows; a 3D MR acquisition
  (MR Acquisition Type 3D) it turns to the nearest RAS orientation instead.
- ``SimpleITKIO`` and ``NibabelIO`` give that file's voxels as (k, j, i) with the spacing in the
  same order; their ``...WithReorient`` variants first turn the image to the nearest RAS.

nnU-Net is an optional extra (``pip install 'pacsworker[nnunet]'``): imported when a model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...config import NnunetModelSettings
from ..model_files import files_digest
from ..outputs import LabelMap, ModelIdentity, ModelResult, ProbabilityMaps, SegmentSpec
from ..series import Series
from .python_class import resolve_device, segments_of

# image_reader_writer -> whether it turns the image to the nearest RAS before reading its voxels
READERS = {"SimpleITKIO": False, "NibabelIO": False, "SimpleITKIOWithReorient": True, "NibabelIOWithReorient": True}


def model_folds(settings: NnunetModelSettings) -> list[int | str]:
    """The configured folds, or, as nnU-Net's predictor does when given none, every ``fold_N`` (and
    ``fold_all``) folder that holds the checkpoint (the command line's ``-f`` defaults to 0-4 instead)."""
    if settings.folds is not None:
        return list(settings.folds)
    folder = Path(settings.source).expanduser()
    found = {path.name.removeprefix("fold_") for path in folder.glob("fold_*") if (path / settings.checkpoint).is_file()}
    return [*sorted(int(name) for name in found if name.isdigit()), *(["all"] if "all" in found else [])]


def trained_model_files(settings: NnunetModelSettings) -> list[Path]:
    """The files nnU-Net computes with: dataset.json, plans.json and each fold's checkpoint
    (training logs and validation outputs beside them change nothing)."""
    folder = Path(settings.source).expanduser()
    return [folder / "dataset.json", folder / "plans.json",
            *(folder / f"fold_{fold}" / settings.checkpoint for fold in model_folds(settings))]


@dataclass(frozen=True)
class ReaderGrid:
    """How a series' (column, row, slice) array becomes the voxels an nnU-Net reader gives, as a
    nibabel orientation transform, and the voxel spacing nnU-Net is told ((k, j, i), mm)."""

    orientation: np.ndarray
    spacing: tuple[float, float, float]

    def image(self, series: Series) -> np.ndarray:
        """The series as nnU-Net gets it: (1, k, j, i) float32 in modality units."""
        from nibabel.orientations import apply_orientation

        columns_rows_slices = series.pixels.transpose(2, 1, 0)
        return np.ascontiguousarray(apply_orientation(columns_rows_slices, self.orientation).transpose(2, 1, 0)[None],
                                    dtype=np.float32)

    def to_series(self, array: np.ndarray) -> np.ndarray:
        """An nnU-Net output on the reader's (k, j, i) grid, or channels of them, back on the
        series' (slices, rows, columns)."""
        from nibabel.orientations import apply_orientation

        if array.ndim == 4:
            return np.stack([self.to_series(channel) for channel in array])
        back = np.empty_like(self.orientation)  # the inverse turn: each output axis back to its input axis
        back[self.orientation[:, 0].astype(int)] = np.column_stack([np.arange(3), self.orientation[:, 1]])
        return np.ascontiguousarray(apply_orientation(array.transpose(2, 1, 0), back).transpose(2, 1, 0))


def refuse_other_readers(reader: str) -> None:
    """Raise ``ValueError`` for an ``image_reader_writer`` that does not read NIfTI files."""
    if reader not in READERS:
        raise ValueError(f"plans.json reads images with {reader}; kind nnunet gives the series as "
                         f"{', '.join(READERS)} read a NIfTI of it (a model trained on other files needs kind python)")


def reader_grid(series: Series, reader: str) -> ReaderGrid:
    """What ``reader`` would give from dcm2niix's NIfTI of ``series`` (see the module's text).

    Raises
    ------
    ValueError
        For a reader that does not read NIfTI files.
    """
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    from ..export import nifti_affine

    refuse_other_readers(reader)
    three_d = series.modality == "MR" and str(series.first.get("MRAcquisitionType", "")).upper() == "3D"
    if READERS[reader] or three_d:
        orientation = ornt_transform(io_orientation(nifti_affine(series)), axcodes2ornt("RAS"))
    else:
        orientation = np.array([[0, 1], [1, -1], [2, 1]])  # dcm2niix: rows reversed
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = series.spacing[::-1]  # (column, row, slice) to the reader's (i, j, k)
    k, j, i = spacing[::-1]
    return ReaderGrid(orientation, (float(k), float(j), float(i)))


@dataclass(frozen=True)
class NnunetSegment:
    """One output of the model: its value in nnU-Net's label map, the channel of its probability
    (softmax: the label's; region-based: the region's sigmoid) and how it is written in the SEG."""

    value: int
    channel: int
    spec: SegmentSpec


def dataset_segments(dataset: dict, label_manager) -> list[NnunetSegment]:
    """The segments dataset.json's ``labels`` name, as nnU-Net's label manager orders them: a
    label's value is its channel; a region ``i`` (``labels: {name: [values]}``) is written as
    ``regions_class_order[i]``, and its name is the ``i``-th region's."""
    names = [name for name, value in dataset["labels"].items() if name != "ignore"]
    segments = []
    if label_manager.has_regions:
        regions = [name for name in names if label_manager.filter_background([_region(dataset["labels"][name])])]
        for channel, (name, value) in enumerate(zip(regions, label_manager.regions_class_order, strict=True)):
            segments.append(NnunetSegment(int(value), channel, SegmentSpec(int(value), name)))
        return segments
    by_value = {int(dataset["labels"][name]): name for name in names}
    for channel, value in enumerate(label_manager.all_labels):
        if value != 0:
            segments.append(NnunetSegment(int(value), channel, SegmentSpec(int(value), by_value[value])))
    return segments


def _region(value):
    return tuple(value) if isinstance(value, list) else value


def coded(segments: list[NnunetSegment], settings: NnunetModelSettings) -> list[NnunetSegment]:
    """The segments with the codes, names and colours ``outputs:`` gives them by label value.

    Raises
    ------
    ValueError
        For a configured label the model does not have.
    """
    if not settings.outputs:
        return segments
    key, config = next(iter(settings.outputs.items()))
    given = {spec.label: spec for spec in segments_of(config)}
    unknown = sorted(set(given) - {segment.value for segment in segments})
    if unknown:
        raise ValueError(f"outputs.{key}: label(s) {unknown} are not in the model's dataset.json labels (values: "
                         f"{', '.join(f'{s.value} {s.spec.name}' for s in segments)})")
    return [NnunetSegment(s.value, s.channel, given.get(s.value, s.spec)) for s in segments]


class NnunetModel:
    """An nnU-Net trained-model folder, its networks loaded once onto the worker's device."""

    def __init__(self, settings: NnunetModelSettings):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.settings = settings
        self.device = resolve_device(settings.device)
        folder = Path(settings.source).expanduser().resolve()
        for name in ("dataset.json", "plans.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not an nnU-Net trained-model folder (no {name}); source: names the "
                                        "folder nnUNetv2_train wrote (Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres)")
        folds = model_folds(settings)
        if not folds:
            raise FileNotFoundError(f"{folder} has no fold_N/{settings.checkpoint} (is training finished? "
                                    "checkpoint: names another file, e.g. checkpoint_best.pth)")
        self.reader = settings.image_reader_writer or \
            json.loads((folder / "plans.json").read_text()).get("image_reader_writer", "SimpleITKIO")
        refuse_other_readers(self.reader)
        self.predictor = nnUNetPredictor(tile_step_size=settings.tile_step_size, use_gaussian=True,
                                         use_mirroring=settings.use_mirroring,
                                         perform_everything_on_device=self.device.startswith("cuda"),
                                         device=torch.device(self.device), verbose=False, verbose_preprocessing=False,
                                         allow_tqdm=False)
        self.predictor.initialize_from_trained_model_folder(str(folder), folds, settings.checkpoint)
        self._one_input(self.predictor)
        self.segments = coded(dataset_segments(self.predictor.dataset_json, self.predictor.label_manager), settings)
        self.output_key, output = next(iter(settings.outputs.items()), ("seg", None))
        self.probabilities = output is not None and output.kind == "probabilities"
        # no version configured: the digest of the files it computes with (the folder's name says little)
        self.identity = ModelIdentity(settings.name, settings.version or
                                      "sha256:" + files_digest(trained_model_files(settings))[:12])

    @staticmethod
    def _one_input(predictor) -> None:
        """pacsworker gives one series: a model of several input channels, or a cascade stage that
        needs the previous stage's output, cannot be run from it."""
        channels = predictor.dataset_json.get("channel_names") or predictor.dataset_json.get("modality") or {}
        if len(channels) != 1:
            raise ValueError(f"the model takes {len(channels)} input channels ({', '.join(map(str, channels.values()))}); "
                             "kind nnunet gives it one series (a model of several inputs needs kind python, scope: study)")
        previous = predictor.configuration_manager.previous_stage_name
        if previous is not None:
            raise ValueError(f"configuration {predictor.configuration_manager.configuration} is a cascade stage: it needs "
                             f"the output of {previous}; configure a model of a configuration that is not a cascade stage")

    def run(self, series: Series) -> ModelResult:
        grid = reader_grid(series, self.reader)
        predicted = self.predictor.predict_single_npy_array(grid.image(series), {"spacing": list(grid.spacing)},
                                                            None, None, self.probabilities)
        specs = tuple(segment.spec for segment in self.segments)
        if self.probabilities:
            probabilities = predicted[1][[segment.channel for segment in self.segments]]
            maps = np.clip(grid.to_series(np.asarray(probabilities, dtype=np.float32)), 0, 1)
            return ModelResult({self.output_key: ProbabilityMaps(maps, specs)})
        labels = grid.to_series(np.asarray(predicted))
        return ModelResult({self.output_key: LabelMap(labels.astype(np.uint8), specs)})
