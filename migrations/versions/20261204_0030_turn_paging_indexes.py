"""Indexes for the claim's order check, a run's paging and the turn callbacks' sweep

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-04 21:30:00

Three reads that grew with the table they read:
- a claim's check for an earlier unfinished turn of each claimed turn's conversation read every turn
  the conversation ever had (only `ix_turns_conversation_id` served it): now the unfinished ones;
- an export, a batch's output and the desk page a run's turns by `number`, which no index of the
  run served (each chunk read and sorted the rest of the run, or walked every run's turns);
- housekeeping's look for turn callbacks never attempted scanned the whole table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_turns_conversation_unfinished": (
        ["conversation_id", "number"],
        "status IN ('queued', 'running')",
    ),
    "ix_turns_run_id_number": (["run_id", "number"], "run_id IS NOT NULL"),
    "ix_turns_callback_unattempted": (
        ["finished_at"],
        "callback_url IS NOT NULL AND callback_delivered_at IS NULL AND callback_retry_at IS NULL",
    ),
}


def upgrade() -> None:
    # CONCURRENTLY, as in 0018: turns are written all the time, also while the indexes build.
    with op.get_context().autocommit_block():
        for name, (columns, where) in INDEXES.items():
            create_index_concurrently(name, "turns", columns, postgresql_where=sa.text(where))


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in reversed(INDEXES):
            drop_index_concurrently(name, "turns")
