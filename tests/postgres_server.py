"""Debian's PostgreSQL, started for the tests and benchmarks: ``initdb`` and ``postgres`` as an
unprivileged user (``postgres`` via runuser when running as root: PostgreSQL refuses root), on a free
loopback port, in a temp dir; one server, a fresh database per test."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "pacsworker"


def binaries() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/<version>/bin`` holding ``postgres``, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """A throw-away PostgreSQL; ``durable=False`` (tests) turns fsync off, benchmarks keep it on."""

    def __init__(self, bin_dir: Path, durable: bool = False):
        self.bin_dir = bin_dir
        self.durable = durable
        self.workdir = Path(tempfile.mkdtemp(prefix="pacsworker-postgres-"))
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._count = 0

    def _as_owner(self, args: list[str]) -> list[str]:
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            return ["runuser", "-u", "postgres", "--", *args]
        return args

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        data = self.workdir / "data"
        subprocess.run(self._as_owner([str(self.bin_dir / "initdb"), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
                                       "--no-locale", "-D", str(data)]),
                       check=True, capture_output=True, timeout=120)
        options = ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200", "-c", "shared_buffers=128MB"]
        if not self.durable:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log = open(self.workdir / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            self._as_owner([str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
                            "-k", str(self.workdir), *options]),
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.workdir / 'postgres.log').read_text()[-2000:]}")
            if self._ready():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"postgres did not start: {(self.workdir / 'postgres.log').read_text()[-2000:]}")

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "ledger") -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        self._count += 1
        name = f"{prefix}_{os.getpid()}_{self._count}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: PostgreSQL's smart shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)
