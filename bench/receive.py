"""Receive throughput: pacsworker's receiver vs DCMTK storescp (TCP_NODELAY=1), several senders, one run.

    .venv/bin/python bench/receive.py [--rounds 5] [--senders storescu,dcmsend,pynetdicom] [--parallel 4]

Series: ct02 (28 CT slices) and a 140-slice CT made from it (5 copies with new UIDs and positions).
Senders: DCMTK storescu and dcmsend (TCP_NODELAY=1, like the anchor), storescu without it (as a
modality usually runs it), and pynetdicom (pacsworker's replay, in this process). Receivers alternate round by round so machine noise hits both alike.
pacsworker writes durably (integrity check, fsync + rename per instance); storescp writes without
fsync. The ratio is pacsworker's time over storescp's with the same sender (below 1 = faster). The
time this disk takes to make one instance durable is measured beside it (the floor), and the ratio
without that wait printed too.

Parallel mode (``--parallel N``, default 4; 0 skips it): N storescu processes (TCP_NODELAY=1) start
at once, each sending its own 140-slice series (distinct UIDs), one association each; the time is
until the last one finished, throughput is all N series' bytes over that time. storescp runs as
DCMTK ships it, serving one association at a time (the anchor); ``storescp --fork`` (a process per
association, not the default and not available on Windows) is measured beside it. The peak RSS of
each receiver (the process and its children, VmRSS polled every 5 ms) during the parallel rounds is
printed, with the kernel's high-water mark (VmHWM) since the receiver started.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

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


def send_parallel(port: int, folders: list[Path]) -> None:
    """One storescu (TCP_NODELAY=1) per folder, all started at once; returns when the last one ends."""
    senders = [subprocess.Popen([STORESCU, "-aet", f"BENCH{i}", "-aec", "PACSWORKER", "+sd", "+r", "-R",
                                 "127.0.0.1", str(port), str(folder)],
                                env=NODELAY, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for i, folder in enumerate(folders)]
    failed = [p.communicate()[1].decode(errors="replace")[-300:] for p in senders]
    failed = [err for p, err in zip(senders, failed) if p.returncode]
    if failed:
        raise RuntimeError(f"{len(failed)} parallel storescu failed: {failed[0]}")


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:  # the process ended meanwhile (a storescp --fork child)
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRSS:
    """Highest sum of VmRSS over a process and its children while active (polled every 5 ms)."""

    def __init__(self, pid: int):
        self.pid, self.peak_kb = pid, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_kb = max(self.peak_kb, sum(_status_kb(p, "VmRSS") for p in _tree(self.pid)))

    def __enter__(self) -> Self:
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def durable_write_floor(folder: Path, size: int, rounds: int = 60) -> float:
    """Median seconds the disk under ``folder`` takes to make one received instance of ``size`` bytes durable
    as pacsworker does (write, fsync, rename into a series folder, fsync of that folder): the part of
    each instance's round trip that storescp, which does not fsync, never pays."""
    incoming, series = folder / "floor-incoming", folder / "floor-series"
    incoming.mkdir()
    series.mkdir()
    payload, times = os.urandom(size), []
    for number in range(rounds):
        path = incoming / f"{number}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, payload)
        started = time.perf_counter()
        os.fsync(fd)
        os.replace(path, series / path.name)
        folder_fd = os.open(series, os.O_RDONLY)
        os.fsync(folder_fd)
        times.append(time.perf_counter() - started)
        os.close(folder_fd)
        os.close(fd)
    return statistics.median(times)


def timed(send, port: int, folder: Path) -> float:
    started = time.perf_counter()
    send(port, folder)
    return time.perf_counter() - started


def timed_parallel(port: int, folders: list[Path], rss: PeakRSS) -> float:
    with rss:
        started = time.perf_counter()
        send_parallel(port, folders)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--senders", default="storescu,storescu-nagle,dcmsend,pynetdicom")
    parser.add_argument("--series", type=Path, default=DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm")
    parser.add_argument("--parallel", type=int, default=4, help="senders at once in the parallel mode (0: skip it)")
    parser.add_argument("--no-fork", action="store_true", help="do not measure storescp --fork in the parallel mode")
    args = parser.parse_args()
    senders = [s for s in args.senders.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        series = [args.series, make_long_series(args.series, tmp / "ct140")]
        parallel = [make_long_series(args.series, tmp / f"par{i}") for i in range(args.parallel)]
        parallel_mb = sum(f.stat().st_size for folder in parallel for f in folder.glob("*.dcm")) / 1e6
        pw_port, dcmtk_port, fork_port = free_port(), free_port(), free_port()
        config = write_config(tmp / "c.yaml", scp={"port": pw_port, "host": "127.0.0.1", "series_quiet_seconds": 3600},
                              storage={"data_dir": str(tmp / "pw")})
        (tmp / "dcmtk").mkdir()
        (tmp / "dcmtk-fork").mkdir()
        pw = subprocess.Popen([sys.executable, "-m", "pacsworker", "scp", "--config", str(config)], cwd=tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dcmtk = subprocess.Popen([STORESCP, "-aet", "PACSWORKER", "-od", str(tmp / "dcmtk"), str(dcmtk_port)],
                                 env=NODELAY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        receivers = {"storescp": (dcmtk, dcmtk_port), "pacsworker": (pw, pw_port)}
        if args.parallel and not args.no_fork:
            fork = subprocess.Popen([STORESCP, "--fork", "-aet", "PACSWORKER", "-od", str(tmp / "dcmtk-fork"),
                                     str(fork_port)], env=NODELAY, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            receivers["storescp --fork"] = (fork, fork_port)
        instance_bytes = int(statistics.median(f.stat().st_size for f in series[1].glob("*.dcm")))
        results, par_times, peaks = [], {name: [] for name in receivers}, {}
        try:
            wait_until(lambda: all(port_open(port) for _, port in receivers.values()), 60, what="the receivers")
            floor = durable_write_floor(tmp, instance_bytes)  # the data_dir's filesystem
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
            if parallel:
                rss = {name: PeakRSS(process.pid) for name, (process, _) in receivers.items()}
                for _ in range(args.rounds):
                    for name, (_, port) in receivers.items():
                        par_times[name].append(timed_parallel(port, parallel, rss[name]))
                peaks = {name: (rss[name].peak_kb, _status_kb(process.pid, "VmHWM"))
                         for name, (process, _) in receivers.items()}
        finally:
            for process, _ in receivers.values():
                process.terminate()
    print(f"{args.rounds} rounds, medians; ratio = pacsworker time / storescp time (below 1 = faster)")
    print(f"{'series':<40} {'sender':<14} {'storescp s':>10} {'pacsworker s':>12} {'ratio':>6} {'pw MB/s':>8} "
          f"{'floor s':>7} {'ratio less floor':>16}")
    for name, count, megabytes, sender, median in results:
        label = f"{name[:30]} ({count})"
        floor_s = floor * count
        print(f"{label:<40} {sender:<14} {median['storescp']:>10.3f} {median['pacsworker']:>12.3f} "
              f"{median['pacsworker'] / median['storescp']:>6.2f} {megabytes / median['pacsworker']:>8.1f} "
              f"{floor_s:>7.3f} {(median['pacsworker'] - floor_s) / median['storescp']:>16.2f}")
    print(f"floor: making one {instance_bytes / 1e6:.2f} MB instance durable on this disk (fsync, rename, fsync of "
          f"its folder) takes {floor * 1e3:.2f} ms (median of 60), per instance, on the path the sender waits on; "
          "storescp does not fsync. 'ratio less floor' is pacsworker's time without that wait over storescp's.")
    if parallel:
        megabytes = parallel_mb
        anchor = statistics.median(par_times["storescp"])
        print(f"\n{len(parallel)} associations at once (storescu, TCP_NODELAY=1), {len(parallel)} x 140 slices, "
              f"{megabytes:.0f} MB; time until the last finished, medians of {args.rounds} interleaved rounds")
        print(f"{'receiver':<18} {'time s':>7} {'MB/s':>7} {'time ratio':>10} {'MB/s ratio':>10} "
              f"{'peak RSS MB':>11} {'VmHWM MB':>9}")
        for name, times in par_times.items():
            median = statistics.median(times)
            peak, hwm = peaks[name]
            print(f"{name:<18} {median:>7.3f} {megabytes / median:>7.1f} {median / anchor:>10.2f} "
                  f"{anchor / median:>10.2f} {peak / 1024:>11.0f} {hwm / 1024:>9.0f}")
        print("ratios are over storescp (one association at a time, DCMTK's default); "
              "peak RSS: process + children during the parallel rounds")


if __name__ == "__main__":
    main()
