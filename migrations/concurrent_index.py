"""Indexes built CONCURRENTLY, so writes go on while they build (migrations run at start-up)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op


def create_index_concurrently(name: str, table: str, columns: list[str], **kw: Any) -> None:
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS, inside the migration's autocommit block. A build that
    was interrupted leaves an INVALID index of that name, which IF NOT EXISTS would accept as done
    (and a migration would then drop the index it replaces): such a one is dropped and built again."""
    if op.get_context().as_sql:  # an offline script: no catalogue to read
        op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **kw)
        return
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
