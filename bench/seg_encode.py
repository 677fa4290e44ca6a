"""SEG encoding and writing: pacsworker (highdicom) vs dcmqi's itkimage2segimage, same mask, same sources.

    .venv/bin/python bench/seg_encode.py [--rounds 3]

Input: a 3-segment label map over a 140-slice CT (5 stacked copies of ct02, new UIDs): ct-body's
Body and Bone, and the body's 20..80 HU voxels as Soft tissue (the head phantom has no lungs),
written as NIfTI for dcmqi. Timed, side by side in one run: building the BINARY SEG and writing it to disk
(what dcmqi's command does; for dcmqi the whole command, which also reads the sources and the
mask that pacsworker already holds), and on its own line everything pacsworker's encoder does
(the per-segment statistics and the SR too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DICOM_DIR  # noqa: E402
from receive import make_long_series  # noqa: E402

from pacsworker.config import ModelSettings  # noqa: E402
from pacsworker.encoders import encode_results  # noqa: E402
from pacsworker.worker.export import write_nifti  # noqa: E402
from pacsworker.worker.outputs import CodedTerm, LabelMap, SegmentSpec  # noqa: E402
from pacsworker.worker.runtime import get_model, run_model  # noqa: E402
from pacsworker.worker.series import Series  # noqa: E402


def dcmqi_metadata(segments) -> dict:
    def code(term):
        return {"CodeValue": term.value, "CodingSchemeDesignator": term.scheme, "CodeMeaning": term.meaning}

    return {
        "ContentCreatorName": "bench", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "dcmqi SEG", "SeriesNumber": "300", "InstanceNumber": "1", "BodyPartExamined": "",
        "segmentAttributes": [[{
            "labelID": s.label, "SegmentDescription": s.name, "SegmentLabel": s.name,
            "SegmentAlgorithmType": "AUTOMATIC", "SegmentAlgorithmName": "ct-body",
            "SegmentedPropertyCategoryCodeSequence": code(s.category),
            "SegmentedPropertyTypeCodeSequence": code(s.property_type),
        } for s in segments]],
        "ContentLabel": "SEGMENTATION", "ContentDescription": "bench", "ClinicalTrialCoordinatingCenterName": "",
    }


def three_segments(volume, body_map: LabelMap) -> LabelMap:
    """ct-body's Body and Bone, plus the body's 20..80 HU voxels as a third segment."""
    body, bone = body_map.segments[0], body_map.segments[2]
    soft = SegmentSpec(2, "Soft tissue", body.category, CodedTerm(scheme="SCT", value="87784001", meaning="Soft tissue"))
    labels = body_map.array.copy()
    labels[(labels == body.label) & (volume.pixels >= 20) & (volume.pixels <= 80)] = soft.label
    return LabelMap(labels, (body, soft, bone))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tool = Path(sys.executable).parent / "itkimage2segimage"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_long_series(DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm", tmp / "ct140")
        files = sorted(folder.glob("*.dcm"))
        settings = ModelSettings(name="ct-body")
        outcome = run_model(files, settings)
        identity = get_model(settings).identity
        volume, label_map = outcome.volume, three_segments(outcome.volume, outcome.label_map)
        _, mask_path = write_nifti(Series(volume), label_map.array, tmp)
        meta = tmp / "meta.json"
        meta.write_text(json.dumps(dcmqi_metadata(list(label_map.segments))))
        ours, seg_only, theirs = [], [], []
        for round_ in range(args.rounds):  # interleaved
            started = time.perf_counter()
            results = encode_results(volume, label_map, identity)
            written = time.perf_counter()
            results.seg.save_as(tmp / f"ours{round_}.dcm", enforce_file_format=True)
            finished = time.perf_counter()
            ours.append(finished - started)
            seg_only.append(results.timings["seg_s"] + finished - written)
            started = time.perf_counter()
            subprocess.run([str(tool), "--inputImageList", str(mask_path), "--inputDICOMDirectory", str(folder),
                            "--outputDICOM", str(tmp / f"dcmqi{round_}.dcm"), "--inputMetadata", str(meta)],
                           check=True, capture_output=True)
            theirs.append(time.perf_counter() - started)
    a, s, b = statistics.median(ours), statistics.median(seg_only), statistics.median(theirs)
    print(f"{volume.pixels.shape} CT, {len(results.statistics)} segments, {args.rounds} rounds (medians)")
    print(f"  pacsworker SEG encode + write           {s:.2f} s")
    print(f"  pacsworker statistics + SEG + SR, write {a:.2f} s")
    print(f"  dcmqi itkimage2segimage                 {b:.2f} s (reads sources and mask itself)")
    print(f"  SEG: pacsworker / dcmqi time {s / b:.2f} ({b / s:.2f}x dcmqi's speed)")
    print(f"  everything: pacsworker / dcmqi time {a / b:.2f} ({b / a:.2f}x dcmqi's speed)")


if __name__ == "__main__":
    main()
