"""Receive throughput: pacsworker's receiver vs DCMTK storescp (TCP_NODELAY=1), several senders, one run.

    .venv/bin/python bench/receive.py [--rounds 5] [--senders storescu,dcmsend,pynetdicom]

Series: ct02 (28 CT slices) and a 140-slice CT made from it (5 copies with new UIDs and positions).
Senders: DCMTK storescu and dcmsend (TCP_NODELAY=1, like the anchor), storescu without it (as a
modality usually runs it), and pynetdicom (pacsworker's replay, in this process). Receivers alternate round by round so machine noise hits both alike.
pacsworker writes durably (integrity check, fsync + rename per instance); storescp writes without
fsync. The ratio is pacsworker's time over storescp's with the same sender (below 1 = faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DICOM_DIR, free_port, port_open, wait_until, write_config  # noqa: E402

from pacsworker.replay import replay  # noqa: E402

STORESCU, DCMSEND, STORESCP = "/usr/bin/storescu", "/usr/bin/dcmsend", "/usr/bin/storescp"
NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def send_storescu(port: int, folder: Path) -> None:
    subprocess.run([STORESCU, "-aet", "BENCH", "-aec", "PACSWORKER", "+sd", "+r", "-R", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True, env=NODELAY)


def send_storescu_nagle(port: int, folder: Path) -> None:
    """storescu as a modality runs it: without TCP_NODELAY its DIMSE stack waits on Nagle's algorithm."""
    subprocess.run([STORESCU, "-aet", "BENCH", "-aec", "PACSWORKER", "+sd", "+r", "-R", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True, env={k: v for k, v in os.environ.items() if k != "TCP_NODELAY"})


def send_dcmsend(port: int, folder: Path) -> None:
    subprocess.run([DCMSEND, "-aet", "BENCH", "-aec", "PACSWORKER", "+sd", "+r", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True, env=NODELAY)


def send_pynetdicom(port: int, folder: Path) -> None:
    report = replay([folder], "127.0.0.1", port, "PACSWORKER", "BENCH")
    if report.failed:
        raise RuntimeError(f"pynetdicom sender: {len(report.failed)} refused")


SENDERS = {"storescu": send_storescu, "storescu-nagle": send_storescu_nagle, "dcmsend": send_dcmsend,
           "pynetdicom": send_pynetdicom}


def make_long_series(source: Path, target: Path, copies: int = 5) -> Path:
    """``copies`` stacked copies of a series as one new series (new UIDs, positions shifted)."""
    target.mkdir(parents=True)
    files = sorted(source.glob("*.dcm"))
    series_uid = generate_uid()
    positions = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    ordered = sorted(positions)
    extent = ordered[-1] - ordered[0] + statistics.median(b - a for a, b in zip(ordered, ordered[1:]))
    for copy in range(copies):
        for index, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + copy * extent
            ds.InstanceNumber = copy * len(files) + index + 1
            ds.save_as(target / f"{copy:02d}_{index:03d}.dcm", enforce_file_format=True)
    return target


def timed(send, port: int, folder: Path) -> float:
    started = time.perf_counter()
    send(port, folder)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--senders", default="storescu,storescu-nagle,dcmsend,pynetdicom")
    parser.add_argument("--series", type=Path, default=DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm")
    args = parser.parse_args()
    senders = [s for s in args.senders.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        series = [args.series, make_long_series(args.series, tmp / "ct140")]
        pw_port, dcmtk_port = free_port(), free_port()
        config = write_config(tmp / "c.yaml", scp={"port": pw_port, "host": "127.0.0.1", "series_quiet_seconds": 3600},
                              storage={"data_dir": str(tmp / "pw")})
        (tmp / "dcmtk").mkdir()
        pw = subprocess.Popen([sys.executable, "-m", "pacsworker", "scp", "--config", str(config)], cwd=tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dcmtk = subprocess.Popen([STORESCP, "-aet", "PACSWORKER", "-od", str(tmp / "dcmtk"), str(dcmtk_port)],
                                 env=NODELAY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = []
        try:
            wait_until(lambda: port_open(pw_port) and port_open(dcmtk_port), 60, what="both receivers")
            for folder in series:
                files = list(folder.glob("*.dcm"))
                megabytes = sum(f.stat().st_size for f in files) / 1e6
                for sender in senders:
                    times = {"pacsworker": [], "storescp": []}
                    for _ in range(args.rounds):
                        times["storescp"].append(timed(SENDERS[sender], dcmtk_port, folder))
                        times["pacsworker"].append(timed(SENDERS[sender], pw_port, folder))
                    median = {k: statistics.median(v) for k, v in times.items()}
                    results.append((folder.name, len(files), megabytes, sender, median))
        finally:
            pw.terminate()
            dcmtk.terminate()
    print(f"{args.rounds} rounds, medians; ratio = pacsworker time / storescp time (below 1 = faster)")
    print(f"{'series':<40} {'sender':<14} {'storescp s':>10} {'pacsworker s':>12} {'ratio':>6} {'pw MB/s':>8}")
    for name, count, megabytes, sender, median in results:
        label = f"{name[:30]} ({count})"
        print(f"{label:<40} {sender:<14} {median['storescp']:>10.3f} {median['pacsworker']:>12.3f} "
              f"{median['pacsworker'] / median['storescp']:>6.2f} {megabytes / median['pacsworker']:>8.1f}")


if __name__ == "__main__":
    main()
