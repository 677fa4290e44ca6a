"""Series to volume: pacsworker's in-process loader vs dcm2niix converting the same folder.

    .venv/bin/python bench/volume_load.py [--rounds 5]

Input: a 140-slice 512 x 512 CT (5 stacked copies of ct02, new UIDs). Timed, interleaved in one
run: ``load_series`` (read, decode, rescale to float32, sort and check the geometry) and the
``dcm2niix`` command writing an uncompressed NIfTI (``-z n``), medians of the rounds.
"""

from __future__ import annotations

import argparse
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

from pacsworker.worker.volume import load_series  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tool = Path(sys.executable).parent / "dcm2niix"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_long_series(DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm", tmp / "ct140")
        files = sorted(folder.glob("*.dcm"))
        ours, theirs = [], []
        for round_ in range(args.rounds):
            started = time.perf_counter()
            volume = load_series(files)
            ours.append(time.perf_counter() - started)
            out = tmp / f"nifti{round_}"
            out.mkdir()
            started = time.perf_counter()
            subprocess.run([str(tool), "-z", "n", "-b", "n", "-o", str(out), "-f", "ct", str(folder)],
                           check=True, capture_output=True)
            theirs.append(time.perf_counter() - started)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{volume.pixels.shape} CT, {args.rounds} rounds (medians)")
    print(f"  pacsworker load_series  {a:.3f} s")
    print(f"  dcm2niix (-z n)         {b:.3f} s")
    print(f"  ratio pacsworker / dcm2niix time: {a / b:.2f} (below 1 = faster)")


if __name__ == "__main__":
    main()
