"""STOW-RS in: pacsworker's door against Orthanc's STOW-RS (DICOMweb plugin) and against C-STORE into
pacsworker, on the same 140-slice CT; and the receiver's peak RSS with four 1 GiB requests at once.

    .venv/bin/python bench/stow.py [--rounds 3] [--concurrent 4] [--big-gib 1]

The 140-slice CT is made from ct02 as bench/receive.py makes it, a fresh copy (new UIDs) for every
send, so no receiver ever sees an instance twice. One request: the whole series in one multipart
body (requests, Content-Length; the body is made before the clock starts). Concurrent: N such
requests at once, each its own series, timed until the last answer. C-STORE: DCMTK storescu
(TCP_NODELAY=1) into pacsworker's DIMSE port, one association, and N at once (storescu reads its
files as it sends, within the time). Rounds alternate the receivers. pacsworker makes every instance durable
(fsync + rename) before it answers; Orthanc 1.10 writes its storage without fsync.

Peak RSS: N requests of one part each (a CT header with ``--big-gib`` GiB of pixel data), streamed
chunked at once into a ``pacsworker scp``; VmRSS of the process polled every 5 ms, and VmHWM.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from receive import PeakRSS, _status_kb, make_long_series, send_parallel, send_storescu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DICOM_DIR, Orthanc, Pacsworker, free_port, port_open, wait_until, write_config  # noqa: E402
from pacsworker.multipart import encode_multipart  # noqa: E402
from test_http_doors import big_part  # noqa: E402

MB = 1 << 20


def request_body(folder: Path) -> tuple[bytes, str]:
    """The STOW-RS body of every instance of ``folder`` (made before the clock starts) and its Content-Type."""
    return encode_multipart([("application/dicom", f.read_bytes()) for f in sorted(folder.glob("*.dcm"))])


def stow(url: str, request: tuple[bytes, str]) -> None:
    """One STOW-RS request; raises unless every instance was stored."""
    body, content_type = request
    answer = requests.post(f"{url}/studies", data=body, timeout=600,
                           headers={"Content-Type": content_type + '; type="application/dicom"',
                                    "Accept": "application/dicom+json"})
    if answer.status_code != 200:
        raise RuntimeError(f"STOW-RS to {url}: {answer.status_code} {answer.text[:300]}")


def at_once(send, targets: list) -> float:
    """Seconds until the last of ``send(target)`` for every target, all started together, has returned."""
    errors: list[BaseException] = []

    def run(target) -> None:
        try:
            send(target)
        except BaseException as exc:  # noqa: BLE001 - reported after the others finished
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(targets)} failed: {errors[0]}")
    return time.perf_counter() - started


def big_request(url: str, pixel_bytes: int) -> None:
    """One STOW-RS request of one CT instance with ``pixel_bytes`` of pixel data, streamed chunked."""
    head, _ = big_part(pixel_bytes)  # the test's CT head, its pixel data's header included
    boundary = "stowbenchboundary"

    def body():
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
        zeros = bytes(MB)
        for _ in range(pixel_bytes // MB):
            yield zeros
        yield f"\r\n--{boundary}--\r\n".encode()

    answer = requests.post(f"{url}/studies", data=body(), timeout=1800,
                           headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.status_code} {answer.text[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--big-gib", type=float, default=1.0, help="GiB per request in the peak-RSS run (0: skip)")
    parser.add_argument("--series", type=Path, default=DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        copies = iter(range(1_000_000))

        def fresh() -> Path:  # a new 140-slice series: no receiver sees an instance twice
            return make_long_series(args.series, tmp / "series" / str(next(copies)))

        sample = fresh()
        megabytes = sum(f.stat().st_size for f in sample.glob("*.dcm")) / 1e6
        port, stow_port = free_port(), free_port()
        config = write_config(tmp / "c.yaml", scp={"host": "127.0.0.1", "port": port, "stow_port": stow_port,
                                                   "series_quiet_seconds": 3600},
                              storage={"data_dir": str(tmp / "pw"), "min_free_bytes": 0})
        pacsworker = Pacsworker(["scp"], config, tmp / "scp.log")
        orthanc = Orthanc(tmp / "orthanc").start()
        times: dict[str, list[float]] = {}
        try:
            wait_until(lambda: port_open(stow_port), 60, what="pacsworker's STOW-RS port")
            pw_url = f"http://127.0.0.1:{stow_port}"
            runs = {
                "pacsworker STOW-RS": lambda folders: at_once(lambda r: stow(pw_url, r), list(map(request_body, folders))),
                "Orthanc STOW-RS": lambda folders: at_once(lambda r: stow(orthanc.dicomweb_url, r),
                                                           list(map(request_body, folders))),
                "pacsworker C-STORE": lambda folders: _cstore(port, folders),
            }
            for _ in range(args.rounds):
                for name, run in runs.items():
                    for label, count in (("1", 1), (str(args.concurrent), args.concurrent)):
                        folders = [fresh() for _ in range(count)]
                        times.setdefault(f"{name} x{label}", []).append(run(folders))
            peak = hwm = 0
            big = 0.0
            before = _status_kb(pacsworker.proc.pid, "VmRSS")
            if args.big_gib:
                rss = PeakRSS(pacsworker.proc.pid)
                with rss:
                    big = at_once(lambda _: big_request(pw_url, int(args.big_gib * 1024) * MB),  # whole MiB
                                  list(range(args.concurrent)))
                peak, hwm = rss.peak_kb, _status_kb(pacsworker.proc.pid, "VmHWM")
        finally:
            pacsworker.stop()
            orthanc.stop()
    print(f"140-slice CT ({megabytes:.0f} MB), medians of {args.rounds} rounds; x1: one request (association), "
          f"x{args.concurrent}: that many at once, each its own series, until the last answer")
    print(f"{'run':<28} {'time s':>7} {'MB/s':>7}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        count = int(name.rpartition("x")[2])
        print(f"{name:<28} {value:>7.3f} {count * megabytes / value:>7.1f}")
    for label in ("1", str(args.concurrent)):
        pw = median[f"pacsworker STOW-RS x{label}"]
        print(f"x{label}: pacsworker STOW-RS / Orthanc STOW-RS time {pw / median[f'Orthanc STOW-RS x{label}']:.2f}; "
              f"pacsworker STOW-RS / pacsworker C-STORE time {pw / median[f'pacsworker C-STORE x{label}']:.2f}")
    if args.big_gib:
        print(f"{args.concurrent} STOW-RS requests of {args.big_gib:g} GiB at once (chunked): {big:.1f} s; receiver "
              f"RSS before {before / 1024:.0f} MB, peak VmRSS {peak / 1024:.0f} MB (polled), VmHWM {hwm / 1024:.0f} MB")


def _cstore(port: int, folders: list[Path]) -> float:
    started = time.perf_counter()
    if len(folders) == 1:
        send_storescu(port, folders[0])
    else:
        send_parallel(port, folders)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
