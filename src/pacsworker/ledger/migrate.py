"""Bringing a ledger's tables to the newest revision (Alembic), at every open; no alembic.ini needed."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x7061_6373  # a PostgreSQL advisory lock: one host migrates, the others wait for it


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def current(connection: Connection) -> str:
    return MigrationContext.configure(connection).get_current_revision() or ""


def upgrade(connection: Connection) -> None:
    """Upgrade to head inside the caller's (write) transaction; on PostgreSQL under an advisory lock."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    if current(connection) != head():
        command.upgrade(alembic_config(connection), "head")
