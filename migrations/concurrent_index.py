"""Indexes built CONCURRENTLY, so writes go on while they build (migrations run at start-up)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import op

from core.settings import settings


def set_lock_timeout(bind: Any, seconds: float) -> None:
    """This connection's lock timeout, for its session: never "0ms" (which is no timeout), never
    past what PostgreSQL takes (2^31 - 1 ms)."""
    ms = max(1, min(round(seconds * 1000), 2**31 - 1))
    bind.execute(sa.text("SELECT set_config('lock_timeout', :ms, false)"), {"ms": f"{ms}ms"})


@contextmanager
def concurrent_lock_timeout() -> Iterator[None]:
    """The lock timeout of a CREATE or DROP INDEX CONCURRENTLY: MLCHAT_MIGRATION_RETRY_S (each such
    statement's own), not the migration's short one (migrations/env.py). Such a build waits for
    every transaction older than it to end, blocking no query meanwhile; cut short after seconds, it
    would leave an INVALID index for every write to maintain, scan the table again on each retry,
    and fail behind any long transaction. Bounded still: an idle transaction never ending fails the
    upgrade in one line."""
    if op.get_context().as_sql:  # an offline script: nothing to set
        yield
        return
    bind = op.get_bind()
    before = bind.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar()
    # at least the statements' own timeout (a retry window of 0 is not "no timeout")
    set_lock_timeout(bind, max(settings.migration_retry_s, settings.migration_lock_timeout_s))
    try:
        yield
    finally:
        bind.execute(sa.text("SELECT set_config('lock_timeout', :before, false)"), {"before": before})


def create_index_concurrently(name: str, table: str, columns: list[str], **kw: Any) -> None:
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS, inside the migration's autocommit block, under
    concurrent_lock_timeout. A build that was interrupted leaves an INVALID index of that name, which
    IF NOT EXISTS would accept as done (and a migration would then drop the index it replaces): such
    a one is dropped and built again."""
    if op.get_context().as_sql:  # an offline script: no catalogue to read
        op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **kw)
        return
    with concurrent_lock_timeout():
        _create(name, table, columns, **kw)


def drop_index_concurrently(name: str, table: str) -> None:
    """DROP INDEX CONCURRENTLY IF EXISTS, inside the migration's autocommit block, under
    concurrent_lock_timeout."""
    with concurrent_lock_timeout():
        op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)


def _create(name: str, table: str, columns: list[str], **kw: Any) -> None:
    invalid = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"
            ),
            {"name": name},
        )
        .scalar()
    )
    if invalid:
        op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
    op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **kw)
