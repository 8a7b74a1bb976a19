"""Indexes for an erasure's lookups

Revision ID: 0045
Revises: 0044
Create Date: 2026-12-06 11:00:00

An erasure deletes a player's conversations, and with them their lines, summaries and facts; each
deleted row is looked up by the foreign keys that point at it to be set free (ON DELETE SET NULL:
`turns.user_message_id`, `summaries.merged_into`, `facts.superseded_by`), and none of them had an
index: a player of 5,000 lines was 5,000 scans of `turns` in one transaction holding their
conversations. The player's conversations themselves were found by scanning the tenant's.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0045"
down_revision: str | None = "0044"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PARTIAL = (
    ("ix_turns_user_message_id", "turns", "user_message_id"),
    ("ix_summaries_merged_into", "summaries", "merged_into"),
    ("ix_facts_superseded_by", "facts", "superseded_by"),
)


def upgrade() -> None:
    # CONCURRENTLY, as in 0032: these tables are written while the service runs.
    with op.get_context().autocommit_block():
        for name, table, column in _PARTIAL:
            create_index_concurrently(name, table, [column], postgresql_where=sa.text(f"{column} IS NOT NULL"))
        create_index_concurrently("ix_conversations_tenant_player", "conversations", ["tenant", "player_id"])


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_conversations_tenant_player", "conversations")
        for name, table, _ in reversed(_PARTIAL):
            drop_index_concurrently(name, table)
