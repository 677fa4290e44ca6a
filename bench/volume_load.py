"""Series to volume: pacsworker's in-process loader vs dcm2niix converting the same folder.

    .venv/bin/python bench/volume_load.py [--rounds 9]

Input: a 140-slice 512 x 512 CT (5 stacked copies of ct02, new UIDs). Timed, interleaved in one
run: ``load_series`` (read, decode, rescale to float32, sort and check the geometry) and the
``dcm2niix`` command writing an uncompressed NIfTI (``-z n``), medians of the rounds. The previous
round's volume is freed before the clock starts (freeing it is not part of loading the next one).
CPU seconds are printed too: on a shared machine they vary less than wall-clock time.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DICOM_DIR
from receive import make_long_series

from pacsworker.worker.volume import load_series


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    tool = Path(sys.executable).parent / "dcm2niix"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_long_series(DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm", tmp / "ct140")
        files = sorted(folder.glob("*.dcm"))
        ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
        shape = None
        for round_ in range(args.rounds):
            cpu, started = time.process_time(), time.perf_counter()
            volume = load_series(files)
            ours.append(time.perf_counter() - started)
            ours_cpu.append(time.process_time() - cpu)
            shape = volume.pixels.shape
            del volume
            out = tmp / f"nifti{round_}"
            out.mkdir()
            cpu, started = children_cpu(), time.perf_counter()
            subprocess.run([str(tool), "-z", "n", "-b", "n", "-o", str(out), "-f", "ct", str(folder)],
                           check=True, capture_output=True)
            theirs.append(time.perf_counter() - started)
            theirs_cpu.append(children_cpu() - cpu)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{shape} CT, {args.rounds} rounds (medians)")
    print(f"  pacsworker load_series  {a:.3f} s  ({statistics.median(ours_cpu):.3f} s CPU, all threads)")
    print(f"  dcm2niix (-z n)         {b:.3f} s  ({statistics.median(theirs_cpu):.3f} s CPU)")
    print(f"  ratio pacsworker / dcm2niix time: {a / b:.2f} (below 1 = faster)")


if __name__ == "__main__":
    main()
