"""The ledger's cost against the length of its history, on SQLite and on PostgreSQL.

    .venv/bin/python bench/ledger.py [--sizes 1000,100000,1000000] [--backends sqlite,postgresql]
                                     [--json-max 100000] [--quick]

For each size, a ledger is filled in bulk with a history of that many series (each with one job of
two inputs, one delivery of two instances, three events; 99% of them done) plus the work of a busy
moment (series receiving, jobs queued and running, some with a silent worker, pending deliveries,
dead letters). Then each operation is timed (median of runs): the status queries (counts per state,
latest 20 series and jobs, dead letters, what is receiving, running and pending), the ``pacsworker
status --json`` command as a user runs it (its own process) beside ``pacsworker --help`` (the start-up
every command pays: interpreter, CLI, settings), one recovery
sweep, one claim, one earlier-result lookup; and claims and transitions per second with 8 worker
processes (claim, heartbeat, finish). PostgreSQL is Debian's, started here (fsync on), as the tests
start it.

Beside it, at the sizes up to ``--json-max`` (100,000), today's JSON design (bench/json_records.py):
the same history as record files in a temp data_dir (under $TMPDIR; removed afterwards), timed with
that code's own functions, from the last revision that had it (see ``--json-rev``): the ``status``
command, ``recover``, ``_claim``, ``earlier_report``. A second table gives each operation's time in
both designs and the ratio JSON/ledger. ``--quick``: 1,000 and 10,000 series only. The load average is printed with each
measurement: on a shared machine it says how far the numbers can be trusted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pacsworker.ledger import Ledger, default_url  # noqa: E402
from postgres_server import PostgresServer, binaries  # noqa: E402

CONFIG_ENV = "PACSWORKER_CONFIG"  # the JSON side's settings are its own
ROOT = "1.2.826.0.1.3680043.8.498"
CHUNK = 50_000
ACTIVE = {"receiving": 20, "queued": 50, "running": 10, "stale": 5, "pending": 20, "dead": 30}
POOL = 400  # queued jobs per worker process for the throughput run
WORKERS = 8
STALE = 600.0


def _uid(kind: int, i: int) -> str:
    return f"{ROOT}.{kind}.{i}"


def history_job_state(n: int, now: float, i: int) -> tuple[str, float, float]:
    """(state, sent_at, heartbeat) of series i's job in a history of ``n`` series."""
    t0 = now - n * 0.1 - 3600
    k = n - ACTIVE["receiving"] - 1 - i  # the newest series hold the active work
    if 0 <= k < ACTIVE["queued"]:
        return "queued", now - 1, 0.0
    k -= ACTIVE["queued"]
    if 0 <= k < ACTIVE["running"]:
        return "running", now - 30, (now - 2 * STALE if k < ACTIVE["stale"] else now - 1)
    k -= ACTIVE["running"]
    if 0 <= k < ACTIVE["pending"]:
        return "delivering", now - 60, 0.0
    k -= ACTIVE["pending"]
    if 0 <= k < ACTIVE["dead"]:
        return "failed", now - 60, 0.0
    return "done", t0 + i * 0.1 + 6, 0.0


def history_rows(n: int, now: float):
    """Rows by table for ``n`` series of history (and the active work), in chunks."""
    t0 = now - n * 0.1 - 3600

    def series():
        for i in range(n):
            t = t0 + i * 0.1
            state = "receiving" if i >= n - ACTIVE["receiving"] else "done"
            yield (_uid(2, i), _uid(3, i // 4), state, "CT", "1.2.840.10008.5.1.4.1.1.2", "MODALITY",
                   '{"body_part": "CHEST"}', 2, 2, t, t + 5, "quiet for 5 s", f"{i:016x}", "", "[]", "")

    def job_state(i: int) -> tuple[str, float, float]:
        return history_job_state(n, now, i)

    def jobs():
        for i in range(n - ACTIVE["receiving"]):
            state, sent, beat = job_state(i)
            t = t0 + i * 0.1 + 6
            outputs = json.dumps({"sr": _uid(5, i), "sr_series": _uid(6, i)})
            yield (f"ct-body_{_uid(2, i)}_{i:016x}", _uid(2, i), _uid(3, i // 4), "ct-body", "series", "",
                   state, 1, "w:1" if state == "running" else "", "", t, sent, beat, t + 1,
                   0.0 if state in ("queued", "running") else t + 30, outputs, "{}", "{}", "[]", "[]", "", "", "",
                   t + 30)
        for w in range(WORKERS):
            for p in range(POOL):
                yield (f"pool_{w}_{p}", _uid(7, w), _uid(8, w), "ct-body", "series", "", "queued", 0, "", "",
                       now - 10, now - 5, 0.0, 0.0, 0.0, "{}", "{}", "{}", "[]", "[]", "", "", "", 0.0)

    def job_series():
        for i in range(n - ACTIVE["receiving"]):
            yield (f"ct-body_{_uid(2, i)}_{i:016x}", _uid(2, i), True)

    def job_inputs():
        for i in range(n - ACTIVE["receiving"]):
            for j in (1, 2):
                yield (f"ct-body_{_uid(2, i)}_{i:016x}", f"{_uid(2, i)}.{j}", _uid(2, i))

    def deliveries():
        for i in range(n - ACTIVE["receiving"]):
            state = job_state(i)[0]
            if state in ("queued", "running"):
                continue
            d = {"delivering": "pending", "failed": "dead-letter"}.get(state, "delivered")
            t = t0 + i * 0.1 + 40
            yield (f"ct-body_{_uid(2, i)}_{i:016x}", "pacs", d, 1, "" if d == "delivered" else "503",
                   d == "dead-letter", now + 60 if d == "pending" else 0.0, t if d == "delivered" else 0.0,
                   now - i * 0.001 if d == "dead-letter" else 0.0)

    def delivery_instances():
        for i in range(n - ACTIVE["receiving"]):
            if job_state(i)[0] in ("queued", "running"):
                continue
            for name in ("seg.dcm", "sr.dcm"):
                yield (f"ct-body_{_uid(2, i)}_{i:016x}", "pacs", name, _uid(9, 2 * i + (name == "sr.dcm")),
                       "delivered", "stored", t0 + i * 0.1 + 40)

    def events():
        for i in range(n):
            t = t0 + i * 0.1
            yield (t, "received", "scp", _uid(3, i // 4), _uid(2, i), None, None, "receiving", 1, "")
            yield (t + 6, "queued", "scp", _uid(3, i // 4), _uid(2, i), f"ct-body_{_uid(2, i)}_{i:016x}", None,
                   "queued", 2, "")
            yield (t + 30, "finished", "w:1", None, None, f"ct-body_{_uid(2, i)}_{i:016x}", None, "delivering", 1, "")

    return {
        "series": (["series_uid", "study_uid", "state", "modality", "sop_class_uid", "calling_aet", "facts",
                    "instances", "frames", "first_seen", "last_seen", "completed_by", "content_digest", "contiguity",
                    "study_models", "reason"], series()),
        "jobs": (["job_id", "series_uid", "study_uid", "model", "scope", "spool_dir", "state", "attempts", "worker",
                  "stage", "queued_at", "sent_at", "heartbeat", "started_at", "finished_at", "outputs", "values",
                  "timings", "implausible", "notes", "reason", "traceback", "delivery_task", "delivery_started_at"],
                 jobs()),
        "job_series": (["job_id", "series_uid", "current"], job_series()),
        "job_inputs": (["job_id", "sop_instance_uid", "series_uid"], job_inputs()),
        "deliveries": (["job_id", "destination", "state", "attempts", "last_error", "permanent", "next_attempt_at",
                        "delivered_at", "dead_lettered_at"], deliveries()),
        "delivery_instances": (["job_id", "destination", "file_name", "sop_instance_uid", "state", "detail",
                                "delivered_at"], delivery_instances()),
        "events": (["at", "kind", "actor", "study_uid", "series_uid", "job_id", "destination", "state", "count",
                    "reason"], events()),
    }


def _chunks(rows):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fill_sqlite(path: Path, n: int, now: float) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    for table, (columns, rows) in history_rows(n, now).items():
        quoted = ", ".join(f'"{c}"' for c in columns)
        sql = f"INSERT INTO {table} ({quoted}) VALUES ({', '.join('?' * len(columns))})"
        for chunk in _chunks(rows):
            conn.executemany(sql, chunk)
            conn.commit()
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()


def fill_postgresql(url: str, n: int, now: float) -> None:
    import psycopg

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for table, (columns, rows) in history_rows(n, now).items():
            quoted = ", ".join(f'"{c}"' for c in columns)
            with cur.copy(f"COPY {table} ({quoted}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")


def timed(action, runs: int = 7) -> float:
    """Median milliseconds of ``action`` (a warm-up run first)."""
    action(0)
    samples = []
    for run in range(1, runs + 1):
        start = time.perf_counter()
        action(run)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def status(ledger: Ledger) -> None:
    ledger.counts()
    ledger.latest_series(20)
    ledger.latest_jobs(20)
    ledger.dead_letters(100)
    ledger.series_in_state("receiving")
    ledger.jobs_in_state("running")
    ledger.deliveries_in_state("pending")


def sweep(ledger: Ledger) -> None:
    ledger.requeue_stale(STALE)
    ledger.jobs_to_send(STALE)
    ledger.deliveries_overdue(STALE)
    ledger.studies_due(60)


def _worker(url: str, w: int, seconds: float, barrier, queue) -> None:
    ledger = Ledger.open(url, actor=f"bench/{w}")
    claims = transitions = 0
    barrier.wait()  # every process started and connected: the clock starts now
    start = time.perf_counter()
    deadline = start + seconds
    for p in range(POOL):
        if time.perf_counter() >= deadline:
            break
        job_id = f"pool_{w}_{p}"
        if ledger.claim_job(job_id, f"w{w}", 3, STALE).won:
            claims += 1
            ledger.heartbeat(job_id, f"w{w}", 1, stage="model")
            ledger.finish_job(job_id, f"w{w}", 1, "no-result", reason="bench")
            transitions += 3
    elapsed = time.perf_counter() - start
    ledger.close()
    queue.put((claims, transitions, elapsed))


def throughput(url: str, seconds: float = 5.0) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    barrier = context.Barrier(WORKERS)
    procs = [context.Process(target=_worker, args=(url, w, seconds, barrier, queue)) for w in range(WORKERS)]
    [p.start() for p in procs]
    results = [queue.get(timeout=600) for _ in procs]
    [p.join() for p in procs]
    elapsed = max(r[2] for r in results)
    return sum(r[0] for r in results) / elapsed, sum(r[1] for r in results) / elapsed


def command_ms(args: list[str], config: Path, runs: int = 5) -> float:
    """Median milliseconds of a ``pacsworker`` command, as a user runs it (a process of its own)."""
    env = dict(os.environ, **{CONFIG_ENV: str(config)})
    command = [str(Path(sys.executable).with_name("pacsworker")), *args]
    return timed(lambda _: subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL), runs=runs)


def measure(url: str, fill, n: int, data_dir: Path) -> dict[str, float]:
    ledger = Ledger.open(url)
    now = ledger.now()
    start = time.perf_counter()
    fill(n, now)
    ledger.recount()
    filled = time.perf_counter() - start
    done = [f"ct-body_{_uid(2, i)}_{i:016x}" for i in range(0, max(1, n - 200), max(1, n // 50))]
    queued = [f"ct-body_{_uid(2, i)}_{i:016x}" for i in (n - ACTIVE["receiving"] - 1 - k for k in range(ACTIVE["queued"]))]
    result = {
        "fill_s": filled,
        "status_ms": timed(lambda _: status(ledger)),
        "sweep_ms": timed(lambda _: sweep(ledger)),
        "claim_ms": timed(lambda run: ledger.claim_job(queued[run], "bench", 3, STALE), runs=7),
        "earlier_ms": timed(lambda run: ledger.earlier_results(ledger.job(done[run % len(done)]))),
    }
    config = data_dir / "bench.yaml"
    storage = {"data_dir": str(data_dir)} | ({"database_url": url} if url.startswith("postgresql") else {})
    config.write_text(json.dumps({"storage": storage}))  # SQLite: data_dir's own ledger
    result["status_cmd_ms"] = command_ms(["status", "--json"], config)
    result["start_up_ms"] = command_ms(["--help"], config)
    result["claims_per_s"], result["transitions_per_s"] = throughput(url)
    counts = ledger.counts()
    assert sum(counts["series"][""].values()) == n, counts
    ledger.close()
    return result


JSON_MARK = ("src/pacsworker/tasks/submit.py", "layout.iter_records(layout.jobs, JobRecord)")  # its recovery sweep


def json_design_source(rev: str, folder: Path) -> tuple[Path, str]:
    """The source of today's JSON design: this checkout's, or (once the ledger replaced it) that of ``rev``
    (default: the commit before the one that took the recovery sweep off the job records), extracted
    under ``folder``. Returns the folder to import ``pacsworker`` from, and which source it is."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()

    path, mark = JSON_MARK
    if not rev:
        if mark in (repo / path).read_text():
            return repo / "src", "this checkout's working tree"
        rev = git("log", "-1", "--format=%H", "-S", mark, "--", path) + "^"
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "src/pacsworker"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src", f"commit {git('log', '-1', '--format=%h %s', commit)[:100]}"


def measure_json(n: int, source: Path) -> dict[str, float]:
    """Today's JSON design at ``n`` series, in a process of its own that imports ``pacsworker`` from ``source``."""
    env = dict(os.environ, PYTHONPATH=str(source))
    env.pop(CONFIG_ENV, None)
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("json_records.py")), str(n), str(source)],
                          env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


OPERATIONS = [("status_ms", "status"), ("sweep_ms", "recovery sweep"), ("claim_ms", "claim"),
              ("earlier_ms", "earlier result")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--backends", default="sqlite,postgresql", help="empty: the JSON design alone")
    parser.add_argument("--json-max", type=int, default=100_000,
                        help="today's JSON design is measured at the sizes up to this many series (0: not at all)")
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 series only")
    parser.add_argument("--json-rev", default="", help="the revision of today's JSON design (default: this checkout "
                        "while it has it, else the commit before the ledger took it over)")
    args = parser.parse_args()
    sizes = [1000, 10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    json_sizes = [n for n in sizes if n <= args.json_max]
    print(f"{os.cpu_count()} CPUs; load average (1/5/15 min) at start: {load()}", flush=True)
    server = PostgresServer(binaries(), durable=True).start() if "postgresql" in backends else None
    rows = []
    loads: dict[tuple[str, int], str] = {}
    try:
        for backend in backends:
            for n in sizes:
                loads[backend, n] = load()
                if backend == "sqlite":
                    folder = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
                    url = default_url(folder)
                    Ledger.open(url).close()
                    fill = lambda n, now, path=folder / "ledger.sqlite3": fill_sqlite(path, n, now)  # noqa: E731
                else:
                    folder = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
                    url = server.create_database("bench")
                    Ledger.open(url).close()
                    fill = lambda n, now, url=url: fill_postgresql(url, n, now)  # noqa: E731
                result = measure(url, fill, n, folder)
                shutil.rmtree(folder, ignore_errors=True)
                rows.append((backend, n, result))
                print(f"{backend:10} {n:>9,} " + "  ".join(f"{k} {v:,.1f}" for k, v in result.items())
                      + f"  (load at start {loads[backend, n]})", flush=True)
    finally:
        if server is not None:
            server.stop()
    json_rows = {}
    scratch = Path(tempfile.mkdtemp(prefix="json-design-"))
    try:
        if json_sizes:
            source, which = json_design_source(args.json_rev, scratch)
            print(f"today's JSON design: {which}", flush=True)
        for n in json_sizes:
            loads["json", n] = load()
            json_rows[n] = measure_json(n, source)
            print(f"{'json':10} {n:>9,} " + "  ".join(f"{k} {v:,.1f}" for k, v in json_rows[n].items())
                  + f"  (load at start {loads['json', n]})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average (1/5/15 min) at end: {load()}")
    if rows:
        print("\n| backend | series | fill (s) | status (ms) | recovery sweep (ms) | claim (ms) | earlier result (ms) "
              "| claims/s (8 procs) | transitions/s (8 procs) | `status --json` command (ms) | over `--help` (ms) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for backend, n, r in rows:
            print(f"| {backend} | {n:,} | {r['fill_s']:.1f} | {r['status_ms']:.1f} | {r['sweep_ms']:.1f} | "
                  f"{r['claim_ms']:.1f} | {r['earlier_ms']:.1f} | {r['claims_per_s']:.0f} | {r['transitions_per_s']:.0f} | "
                  f"{r['status_cmd_ms']:.0f} | {r['status_cmd_ms'] - r['start_up_ms']:.0f} |")
    if json_rows:
        ledger = {(backend, n): r for backend, n, r in rows}
        head = "| series | operation | JSON today (ms) |" + "".join(f" {b} (ms) | JSON/{b} |" for b in backends)
        print("\n" + head)
        print("|---:|---|---:|" + "---:|---:|" * len(backends))
        for n, j in json_rows.items():
            for key, name in OPERATIONS:
                line = f"| {n:,} | {name} | {j[key]:,.1f} |"
                for backend in backends:
                    r = ledger.get((backend, n))
                    ratio = j[key] / r[key] if r else 0.0
                    line += f" {r[key]:,.1f} | {ratio:.1f}x |" if r and ratio < 10 else (
                        f" {r[key]:,.1f} | {ratio:,.0f}x |" if r else " - | - |")
                print(line)
        print("\n| series | JSON record files (lock files besides) | JSON fill (s) | load 1/5/15 min at JSON start |"
              + "".join(f" load at {b} start |" for b in backends))
        print("|---:|---:|---:|---|" + "---|" * len(backends))
        for n, j in json_rows.items():
            print(f"| {n:,} | {j['files']:,.0f} | {j['fill_s']:.1f} | {loads['json', n]} |"
                  + "".join(f" {loads.get((b, n), '-')} |" for b in backends))


if __name__ == "__main__":
    main()
