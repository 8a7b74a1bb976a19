"""A conversation's turns by number, newest first, from an index

Revision ID: 0047
Revises: 0046
Create Date: 2026-12-06 19:30:00

A memory job is sent to the model of its conversation's newest turn (tasks/memory.py), found with
`ORDER BY number DESC LIMIT 1`: `ix_turns_conversation_id` alone left that a read and a sort of
every turn of the conversation, or a walk of `number`'s own index backwards past the whole table's
newer turns. `(conversation_id, number)` serves it, and every lookup the old index served; the old
one goes.
"""

from collections.abc import Sequence

from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0047"
down_revision: str | None = "0046"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY, as in 0045: turns are written while the service runs.
    with op.get_context().autocommit_block():
        create_index_concurrently("ix_turns_conversation_number", "turns", ["conversation_id", "number"])
        drop_index_concurrently("ix_turns_conversation_id", "turns")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        create_index_concurrently("ix_turns_conversation_id", "turns", ["conversation_id"])
        drop_index_concurrently("ix_turns_conversation_number", "turns")
