"""Where the ledger lives: its URL, the engine (SQLite or PostgreSQL) and the refusal of SQLite on a network file system."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import Double

SQLITE_FILE = "ledger.sqlite3"
BUSY_TIMEOUT_MS = 30_000
# file systems on which SQLite's locking (and so its WAL) is not safe: the ledger must be PostgreSQL there
NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs",
    "fuse.cephfs", "fuse.s3fs", "fuse.rclone", "9p", "virtiofs", "lustre", "gpfs", "beegfs", "ocfs2", "gfs2",
}


class LedgerError(RuntimeError):
    """The ledger cannot be opened as configured; the message says why and what to change."""


def default_url(data_dir: Path | str) -> str:
    """The ledger of one host: ``sqlite:///<data_dir>/ledger.sqlite3``."""
    return f"sqlite:///{Path(data_dir).resolve() / SQLITE_FILE}"


def normalise_url(url: str) -> URL:
    """``postgresql://`` (and ``postgres://``) mean psycopg 3; SQLite and psycopg URLs are kept as given.

    Raises
    ------
    LedgerError
        For a database other than SQLite or PostgreSQL.
    """
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise LedgerError(f"storage.database_url {parsed.render_as_string(hide_password=True)}: driver {driver!r} "
                              "is not supported; use postgresql://... (psycopg 3)")
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    raise LedgerError(f"storage.database_url {parsed.render_as_string(hide_password=True)}: the ledger runs on SQLite "
                      "(empty: a file under data_dir) or PostgreSQL (postgresql://user@host/db)")


def filesystem_of(path: Path, mountinfo: str) -> tuple[str, str]:
    """The file system type and mount point holding ``path``, from ``/proc/self/mountinfo`` text."""
    best = ("", "")
    target = str(path)
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        mount_point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        fstype = fields[dash + 1] if len(fields) > dash + 1 else ""
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best[1]):  # the deepest mount wins; a later one over it too
            best = (fstype, mount_point)
    return best


def refuse_network_filesystem(folder: Path, mountinfo: str | None = None) -> None:
    """Refuse a SQLite ledger in a folder on a network file system (its locks do not hold there).

    Raises
    ------
    LedgerError
        Naming the folder, its file system and the fix.
    """
    folder = Path(folder).resolve()
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return  # not Linux: nothing to tell by
    fstype, mount_point = filesystem_of(folder, mountinfo)
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs"):
        raise LedgerError(
            f"the ledger's SQLite file would be in {folder}, on a network file system ({fstype} mounted at "
            f"{mount_point}); SQLite's locks do not hold there, so several hosts would corrupt it. Set "
            "storage.database_url: postgresql://user@host/pacsworker (one PostgreSQL for every host), or put "
            "storage.data_dir on a local disk."
        )


def create_ledger_engine(url: URL) -> Engine:
    """An engine with the ledger's transaction rules: SQLite WAL + busy timeout + foreign keys, writes
    under ``BEGIN IMMEDIATE``; PostgreSQL in READ COMMITTED."""
    if url.get_backend_name() == "postgresql":
        return create_engine(url, isolation_level="READ COMMITTED", pool_pre_ping=True, pool_size=2, max_overflow=4)
    database = url.database or ""
    if database and database != ":memory:":
        folder = Path(database).resolve().parent
        refuse_network_filesystem(folder)
        folder.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun below, not by the sqlite3 module
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", f"busy_timeout={BUSY_TIMEOUT_MS}", "foreign_keys=ON", "synchronous=NORMAL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # a writer takes the write lock at BEGIN: a deferred BEGIN that upgrades later can fail at once (SQLITE_BUSY)
        write = connection.get_execution_options().get("ledger_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class db_now(FunctionElement):  # noqa: N801 - used like a SQL function
    """The database's clock in seconds since the epoch: heartbeats and staleness never use a host's clock."""

    type = Double()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _sqlite_now(_element, _compiler, **_kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _postgresql_now(_element, _compiler, **_kw) -> str:
    return "EXTRACT(EPOCH FROM clock_timestamp())::double precision"


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
