"""Facts record the lines they were read from

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-05 09:00:00

A writer's edit of a line dropped the summaries that told its old text, but the facts extracted from
it stayed: the NPC went on knowing what the writer had rejected. An extracted fact now records its
conversation and the first and last line of the stretch it was read from, so an edit drops the
facts of that stretch and of those after it, and extraction reads them again. Facts extracted
before this revision record no lines and are left as they are (their source names the last line's
turn only, not where the stretch began).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0035"
down_revision: str | None = "0034"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = {
    "source_conversation_id": sa.BigInteger(),
    "source_first_seq": sa.Integer(),
    "source_last_seq": sa.Integer(),
}


def upgrade() -> None:
    # Nullable, no default: no rewrite of the table. if_not_exists, as in 0027: the autocommit block
    # below commits them first, so an index build cut off makes the retry find them there.
    for name, type_ in COLUMNS.items():
        op.add_column("facts", sa.Column(name, type_, nullable=True), if_not_exists=True)
    # CONCURRENTLY, as in 0034: facts are written at every extraction.
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "ix_facts_read_from_lines",
            "facts",
            ["source_conversation_id", "source_last_seq"],
            postgresql_where=sa.text("source_conversation_id IS NOT NULL"),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_facts_read_from_lines", "facts")
    for name in reversed(COLUMNS):
        op.drop_column("facts", name, if_exists=True)
