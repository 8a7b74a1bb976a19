"""Alembic environment: the URL comes from settings (or the embedded PostgreSQL)."""

import logging
import time
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool, text
from sqlalchemy.exc import DBAPIError

from core.services import database_url
from core.settings import settings
from db.migrate import (
    MIGRATION_LOCK_KEY,
    SchemaBehind,
    ServerTooOld,
    code_head,
    include_name,
    newer_schema,
    schema_ahead,
    server_too_old,
)
from db.models import Base
from db.session import keep_server_alive
from migrations.concurrent_index import set_lock_timeout

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
LOCK_POLL_S = 0.5  # how often a process waiting for another's migration tries the lock again
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a statement that gave up waiting (lock_timeout)
logger = logging.getLogger("mlchat.migrate")


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        include_name=include_name,
        transaction_per_migration=True,
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
        too_old = server_too_old(int(connection.execute(text("SHOW server_version_num")).scalar_one()))
        connection.commit()
        if too_old is not None:
            raise ServerTooOld(too_old)
        if not _newer_than_this_code(connection):
            _run_giving_way(connection)
    finally:
        connection.rollback()  # a failed migration's transaction, so the unlock can run
        connection.execute(text("RESET lock_timeout"))
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()


def _newer_than_this_code(connection: Connection) -> bool:
    """An upgrade to head of a database that a newer release migrated past this code's head (a
    rollback to an older image): said in one line and left as it is, where alembic would fail on a
    revision it does not know. Read under the migration lock: a newer release may have migrated it
    while this process waited."""
    try:
        target = context.get_revision_argument()  # "head" comes resolved to its revision
    except KeyError:  # a command that migrates nothing (revision --autogenerate, check, current)
        return False
    targets = set(target) if isinstance(target, tuple) else {target}  # "heads": a tuple
    if not targets <= {"head", "heads", code_head()}:
        return False
    try:
        ahead = schema_ahead(connection)
    except SchemaBehind:  # what the upgrade is for
        return False
    finally:
        connection.commit()  # the read's transaction: Alembic begins its own
    if ahead is None:
        return False
    logger.warning("%s: not migrating", newer_schema(ahead))
    return True


def _run_giving_way(connection: Connection) -> None:
    """Run the pending migrations; one whose statement waits past the lock timeout (a long transaction
    holds the table: every query after it would queue behind its ALTER) gives way, rolled back, and
    the upgrade is tried again after a pause, for MLCHAT_MIGRATION_RETRY_S in all."""
    set_lock_timeout(connection, settings.migration_lock_timeout_s)
    connection.commit()
    deadline, pause = time.monotonic() + settings.migration_retry_s, 1.0
    while True:
        # Each revision a transaction of its own: one upgrade's first revision held its tables'
        # locks (0039's new column on turns) while a later one waited for another table (0043's
        # index on write_keys), and the fleet's every query on turns stood still behind it; a lock
        # timeout now rolls back the waiting revision alone.
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            include_name=include_name,
            compare_server_default=True,  # `alembic check`: older code's inserts rely on these defaults
            transaction_per_migration=True,
        )
        try:
            with context.begin_transaction():
                context.run_migrations()
            return
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            connection.rollback()
            if time.monotonic() + pause > deadline:
                raise RuntimeError(
                    f"a migration waited for a table's lock for MLCHAT_MIGRATION_RETRY_S="
                    f"{settings.migration_retry_s:g} s: a long transaction holds it (see pg_stat_activity);"
                    " nothing was changed past the last finished revision: run it again"
                ) from None
            logger.warning(
                "a migration gave way after %g s waiting for a table's lock; trying again in %g s",
                settings.migration_lock_timeout_s,
                pause,
            )
            time.sleep(pause)
            pause = min(pause * 2, 30.0)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = database_url()
    # A migration holds its advisory lock and table locks: freed within a minute if its host is lost.
    connectable = keep_server_alive(
        engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    )
    with connectable.connect() as conn:
        _migrate(conn)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
