"""Indexes for the summaries a prompt shows and for the sweep's look at stalled memory jobs

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-05 06:30:00

- Every live turn reads its conversation's summaries not merged into another (and each reply's store
  the last line they cover), and the only index held every level: a long conversation's thousands
  of merged summaries were read each time to keep a dozen.
- `mlchat sweep` looks for memory jobs whose message went missing (a queued mark past its time, a
  claim whose lease lapsed): without an index, every memory job row at each sweep.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0034"
down_revision: str | None = "0033"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_summaries_unmerged": ("summaries", ["conversation_id", "first_seq"], "merged_into IS NULL"),
    "ix_memory_jobs_queued_until": ("memory_jobs", ["queued_until"], "queued_until IS NOT NULL"),
    "ix_memory_jobs_claimed_lease": ("memory_jobs", ["lease_until"], "token IS NOT NULL"),
}


def upgrade() -> None:
    # CONCURRENTLY, as in 0030: both tables are written at every stored reply.
    with op.get_context().autocommit_block():
        for name, (table, columns, where) in INDEXES.items():
            create_index_concurrently(name, table, columns, postgresql_where=sa.text(where))


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, (table, _, _) in reversed(INDEXES.items()):
            drop_index_concurrently(name, table)
