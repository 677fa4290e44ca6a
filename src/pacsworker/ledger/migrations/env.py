"""Alembic's environment for the ledger: run by :func:`pacsworker.ledger.migrate.upgrade` on a connection it gives."""

from __future__ import annotations

from alembic import context

from pacsworker.ledger.schema import metadata


def run_migrations() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      compare_type=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


# alembic runs this file to migrate; anything else that imports it (an import check) only defines the function
if getattr(context, "config", None) is not None:
    run_migrations()
