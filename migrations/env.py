"""Alembic environment: the URL comes from settings (or the embedded PostgreSQL)."""

import time
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool, text

from core.services import database_url
from db.migrate import MIGRATION_LOCK_KEY, include_name
from db.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
LOCK_POLL_S = 0.5  # how often a process waiting for another's migration tries the lock again


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(), target_metadata=target_metadata, literal_binds=True, include_name=include_name
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    """Run the migrations under the database's migration lock: processes that start together (every
    serverless container runs `upgrade` at start) migrate one after the other, and the later ones find
    the schema at head. A session-level lock, held across the migrations' own commits."""
    # Polled, never waited for inside a statement: a waiting transaction holds a snapshot, which the
    # holder's CREATE INDEX CONCURRENTLY (0018, 0021) waits out, while the waiter waits for the
    # holder: a deadlock. Between tries this connection holds no transaction.
    while True:
        locked = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        got = bool(locked.scalar())
        connection.commit()  # the lock, once taken, stays; Alembic begins its own transaction
        if got:
            break
        time.sleep(LOCK_POLL_S)
    try:
        context.configure(connection=connection, target_metadata=target_metadata, include_name=include_name)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.rollback()  # a failed migration's transaction, so the unlock can run
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = database_url()
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as conn:
        _migrate(conn)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
