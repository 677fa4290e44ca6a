"""A stand-in for ``docker run`` of a packaged MONAI Deploy application (MAP), for testing
pacsworker's ``command`` template where Docker cannot run.

It takes what ``docker run`` would (``run [--rm] [-e KEY=VALUE] [-v HOST:CONTAINER[:ro]] IMAGE``),
resolves the MAP's standard folders (/var/holoscan/input, /var/holoscan/output,
/opt/holoscan/models) through the mounts, and does what a small MAP would: one DICOM SEG of the
CT series (voxels above 300 HU, via highdicom) into the output folder, plus ``map-report.json``
saying what it was given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

MAP_INPUT, MAP_OUTPUT, MAP_MODELS = "/var/holoscan/input", "/var/holoscan/output", "/opt/holoscan/models"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="docker")
    parser.add_argument("verb", choices=["run"])
    parser.add_argument("--rm", action="store_true")
    parser.add_argument("-e", "--env", action="append", default=[])
    parser.add_argument("-v", "--volume", action="append", default=[])
    parser.add_argument("image")
    args = parser.parse_args(argv)
    mounts = {}
    for volume in args.volume:
        host, container = volume.split(":")[:2]
        mounts[container] = Path(host)
    if MAP_INPUT not in mounts or MAP_OUTPUT not in mounts:
        print(f"stand-in MAP: {MAP_INPUT} and {MAP_OUTPUT} must be mounted", file=sys.stderr)
        return 2
    sources = [pydicom.dcmread(path) for path in sorted(mounts[MAP_INPUT].iterdir())]
    normal = np.cross(*np.reshape(np.array(sources[0].ImageOrientationPatient, dtype=float), (2, 3)))
    sources.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))))
    hounsfield = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in sources])
    bone = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Bone", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Bone, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="stand-in MAP", version="1.0", family=codes.cid7162.ArtificialIntelligence),
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=(hounsfield > 300).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[bone],
        series_instance_uid=hd.UID(), series_number=901, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="pacsworker tests", manufacturer_model_name="stand-in MAP", software_versions="1.0",
        device_serial_number="1", series_description=f"{args.image} bone",
    )
    output = mounts[MAP_OUTPUT]
    seg.save_as(output / "bone.dcm")
    report = {
        "image": args.image, "mounts": {k: str(v) for k, v in mounts.items()}, "input_files": len(sources),
        "holoscan_env": {k: v for k, v in os.environ.items() if k.startswith("HOLOSCAN_")},
        "model_mounted": MAP_MODELS in mounts and mounts[MAP_MODELS].exists(),
    }
    (output / "map-report.json").write_text(json.dumps(report, indent=2))
    print(f"stand-in MAP {args.image}: {len(sources)} images in, bone.dcm out")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
