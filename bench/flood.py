"""A flood of one-instance series (an X-ray department's day) through the real receiver: does completion
keep up, and do ``status``, the status page and ``/metrics`` cost the same at the end as near the start?

    .venv/bin/python bench/flood.py [--series 20000] [--early 500] [--repeat 5]

One CT slice of ct02 is sent again and again, each time as its own study and series (new UIDs,
Images in Acquisition 1, so each series completes on evidence after ``scp.evidence_quiet_seconds``),
over one association per 1,000 instances from this process (pynetdicom). No model takes a
one-instance CT series, so each ends as skipped: the ledger holds one series row and its events per
instance, as a department that sends only X-rays would leave it.

At ``--early`` series received and again at the end, each view is timed ``--repeat`` times (median):
``pacsworker status --json`` as a whole process (its interpreter start-up timed alone beside it),
the status page (GET /), and ``/metrics``. Completion lag: from the last C-STORE response until the
ledger holds every series as complete.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DICOM_DIR, Pacsworker, free_port, ledger_of, port_open, wait_until, write_config  # noqa: E402

SOURCE = DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm"
PER_ASSOCIATION = 1000


def _instances(template: pydicom.Dataset, count: int):
    for _ in range(count):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.ImagesInAcquisition = 1
        yield ds


def send(port: int, template: pydicom.Dataset, count: int) -> None:
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context(CTImageStorage, str(template.file_meta.TransferSyntaxUID))
    left = count
    while left:
        batch = min(left, PER_ASSOCIATION)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSWORKER")
        if not assoc.is_established:
            raise SystemExit("the receiver refused the association")
        for ds in _instances(template, batch):
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                raise SystemExit(f"C-STORE refused: {status}")
        assoc.release()
        left -= batch


def _median_seconds(action, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def views(config: Path, metrics_port: int, repeat: int) -> dict[str, float]:
    def status() -> None:
        subprocess.run([sys.executable, "-m", "pacsworker", "status", "--json", "--config", str(config)],
                       check=True, capture_output=True)

    def interpreter() -> None:  # what every command pays before it reads anything
        subprocess.run([sys.executable, "-c", "import pacsworker.cli"], check=True, capture_output=True)

    def get(path: str):
        return lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=60).read()

    return {"status --json": _median_seconds(status, repeat), "(start-up alone)": _median_seconds(interpreter, repeat),
            "status page": _median_seconds(get("/"), repeat), "/metrics": _median_seconds(get("/metrics"), repeat)}


def completed(data_dir: Path) -> int:
    counts = ledger_of(data_dir).state_counts("series")
    return sum(n for state, n in counts.items() if state != "receiving")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20000)
    parser.add_argument("--early", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    template = pydicom.dcmread(sorted(SOURCE.glob("*.dcm"))[0])
    with tempfile.TemporaryDirectory(prefix="pacsworker-flood-") as tmp:
        folder = Path(tmp)
        port, metrics_port = free_port(), free_port()
        config = write_config(folder / "flood.yaml", scp={"port": port, "host": "127.0.0.1", "evidence_quiet_seconds": 0.5},
                              storage={"data_dir": str(folder / "data")},
                              metrics={"host": "127.0.0.1", "port": metrics_port, "records_cache_seconds": 0})
        receiver = Pacsworker(["scp"], config, folder / "scp.log")
        try:
            wait_until(lambda: port_open(port) and port_open(metrics_port), 120, what="the receiver to listen")
            rows = []
            for target, sent in ((args.early, 0), (args.series, args.early)):
                started = time.perf_counter()
                send(port, template, target - sent)
                sent_s = time.perf_counter() - started
                last = time.perf_counter()
                wait_until(lambda target=target: completed(folder / "data") >= target, 3600,
                           what=f"{target} series to complete")
                lag = time.perf_counter() - last
                rows.append((target, (target - sent) / sent_s, lag, views(config, metrics_port, args.repeat)))
        finally:
            receiver.stop()
    print(f"flood of one-instance series through pacsworker scp (SQLite ledger; load {os.getloadavg()[0]:.2f})")
    names = list(rows[0][3])
    print(f"{'series':>8} {'recv/s':>8} {'lag s':>7} " + " ".join(f"{n:>17}" for n in names))
    for target, rate, lag, timed in rows:
        print(f"{target:>8} {rate:>8.0f} {lag:>7.2f} " + " ".join(f"{timed[n] * 1000:>14.0f} ms" for n in names))
    (first, *_, last_row) = rows
    print("end / start: " + ", ".join(f"{n} {last_row[3][n] / first[3][n]:.2f}x" for n in names))


if __name__ == "__main__":
    main()
