"""Indexes built CONCURRENTLY, so writes go on while they build (migrations run at start-up)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import op


@contextmanager
def no_lock_timeout() -> Iterator[None]:
    """Without the migration's lock timeout (migrations/env.py): CREATE or DROP INDEX CONCURRENTLY
    waits for every transaction older than it to end, blocking no query meanwhile, and one that gave
    up after the timeout would leave an INVALID index for every write to maintain, then scan the
    table again on each retry, and fail the upgrade behind any long transaction."""
    if op.get_context().as_sql:  # an offline script: nothing to set
        yield
        return
    bind = op.get_bind()
    before = bind.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar()
    bind.execute(sa.text("SELECT set_config('lock_timeout', '0', false)"))
    try:
        yield
    finally:
        bind.execute(sa.text("SELECT set_config('lock_timeout', :before, false)"), {"before": before})


def create_index_concurrently(name: str, table: str, columns: list[str], **kw: Any) -> None:
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS, inside the migration's autocommit block, waiting
    without a lock timeout. A build that was interrupted leaves an INVALID index of that name, which
    IF NOT EXISTS would accept as done (and a migration would then drop the index it replaces): such
    a one is dropped and built again."""
    if op.get_context().as_sql:  # an offline script: no catalogue to read
        op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **kw)
        return
    with no_lock_timeout():
        _create(name, table, columns, **kw)


def drop_index_concurrently(name: str, table: str) -> None:
    """DROP INDEX CONCURRENTLY IF EXISTS, inside the migration's autocommit block, waiting without a
    lock timeout."""
    with no_lock_timeout():
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
