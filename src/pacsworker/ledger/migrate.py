"""Bringing a ledger's tables to the newest revision (Alembic), at every open; no alembic.ini needed.

Every command opens the ledger, so the check costs one query: the revision the database holds is
compared with :data:`HEAD`, and Alembic (a fifth of a second to import) is loaded only when they differ.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x7061_6373  # a PostgreSQL advisory lock: one host migrates, the others wait for it
HEAD = "0001"  # the newest revision in migrations/versions; tests hold it to Alembic's own head


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision as Alembic reads it from the migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def current(connection: Connection) -> str:
    """The revision the database holds; empty for a new database."""
    if not inspect(connection).has_table("alembic_version"):
        return ""
    return str(connection.execute(text("SELECT version_num FROM alembic_version")).scalar() or "")


def upgrade(connection: Connection) -> None:
    """Upgrade to head inside the caller's (write) transaction; on PostgreSQL under an advisory lock."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    if current(connection) != HEAD:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines describe its plugins, not the ledger
        from alembic import command

        command.upgrade(alembic_config(connection), "head")
