"""Idempotency keys of facts and story events are pruned once past their time

Revision ID: 0043
Revises: 0042
Create Date: 2026-12-05 21:00:00

`write_keys` (migration 0029) kept every key for ever: a row per keyed fact or story-event write,
never read again after its retries. Keys older than `MLCHAT_WRITE_KEY_TTL_S` (a week) are now
deleted a hundred at a time as new ones are taken; this index finds the oldest without reading the
table. A retry under a pruned key writes again, as a request without one would.
"""

from collections.abc import Sequence

from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0043"
down_revision: str | None = "0042"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY (review): the table this index is for is the one that grew for ever, and a plain
    # build held every keyed write of facts and story events for its length.
    with op.get_context().autocommit_block():
        create_index_concurrently("ix_write_keys_created_at", "write_keys", ["created_at"])


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_write_keys_created_at", "write_keys")
