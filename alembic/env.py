"""Alembic environment: migrates the database named by the service settings."""

from __future__ import annotations

import time
from logging.config import fileConfig

from sqlalchemy import Connection, create_engine, pool

from alembic import context
from moderation.config import get_settings
from moderation.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def run_migrations_offline() -> None:
    """Emit SQL without a database connection."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


_MIGRATION_LOCK = 7215063


def _take_migration_lock(conn: Connection) -> None:
    """Wait for the migration lock holding no snapshot between tries.

    A session waiting inside pg_advisory_lock keeps its transaction's snapshot, and CREATE INDEX
    CONCURRENTLY in the migrator holding the lock waits for every older snapshot: a deadlock.
    """
    while True:
        taken = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({_MIGRATION_LOCK})").scalar()
        conn.commit()
        if taken:
            return
        time.sleep(0.5)


def run_migrations_online() -> None:
    """Migrate over a live connection, serialised by an advisory lock so parallel starts are safe."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        # A session-level lock: it must outlive the commits of migrations that build indexes
        # concurrently (outside a transaction), which would release a transaction-level one.
        _take_migration_lock(conn)
        try:
            # A transaction per migration: the locks one takes (a swap of indexes, say) end with it, not
            # with the last migration of the run.
            context.configure(
                connection=conn,
                target_metadata=target_metadata,
                compare_type=True,
                transaction_per_migration=True,
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            conn.rollback()
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK})")
            conn.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
