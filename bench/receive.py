"""Receive throughput: pacsworker's receiver vs DCMTK storescp (TCP_NODELAY=1), same sender, one run.

    .venv/bin/python bench/receive.py [--rounds 5] [--series ../shared/dicom/ct02_...]

pacsworker writes durably (fsync + rename per instance); storescp writes without fsync.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DICOM_DIR, free_port, port_open, wait_until, write_config  # noqa: E402

STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"


def send(port: int, folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run([STORESCU, "-aet", "BENCH", "-aec", "PACSWORKER", "+sd", "+r", "-R", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--series", type=Path, default=DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm")
    args = parser.parse_args()
    files = list(args.series.glob("*.dcm"))
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pw_port, dcmtk_port = free_port(), free_port()
        config = write_config(tmp / "c.yaml", scp={"port": pw_port, "host": "127.0.0.1", "series_quiet_seconds": 3600},
                              storage={"data_dir": str(tmp / "pw")})
        (tmp / "dcmtk").mkdir()
        pw = subprocess.Popen([sys.executable, "-m", "pacsworker", "scp", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dcmtk = subprocess.Popen([STORESCP, "-aet", "PACSWORKER", "-od", str(tmp / "dcmtk"), str(dcmtk_port)],
                                 env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: port_open(pw_port) and port_open(dcmtk_port), 60, what="both receivers")
            times = {"pacsworker": [], "storescp": []}
            for _ in range(args.rounds):  # interleaved so machine noise hits both alike
                times["storescp"].append(send(dcmtk_port, args.series))
                times["pacsworker"].append(send(pw_port, args.series))
        finally:
            pw.terminate()
            dcmtk.terminate()
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"series: {args.series.name} ({len(files)} instances, {megabytes:.1f} MB), {args.rounds} rounds")
    for name, value in median.items():
        print(f"  {name:<11} median {value:.3f} s  {len(files) / value:7.1f} instances/s  {megabytes / value:6.1f} MB/s")
    print(f"  ratio pacsworker/storescp time: {median['pacsworker'] / median['storescp']:.2f} (below 1 = faster)")


if __name__ == "__main__":
    main()
