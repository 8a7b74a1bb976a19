"""Memory jobs count their failures

Revision ID: 0040
Revises: 0039
Create Date: 2026-12-05 18:00:00

A memory job step that raised (the database, the engine or the embedder away a moment; a schema the
engine rejects) was logged and given back with its queued mark cleared: nothing sent it again but the
conversation's next reply, which an idle conversation never has, and one that failed every time ran
again at every reply, unseen. A job now counts its failures since its last stored step, with the last
error and when it may run again: it is sent again after a backoff, and after
MLCHAT_MEMORY_JOB_MAX_FAILURES it is given up, said in the log, until `mlchat memory retry` (or an
edit of the conversation at the desk) gives it another go.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0040"
down_revision: str | None = "0039"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("memory_jobs", sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
    op.add_column("memory_jobs", sa.Column("last_error", sa.Text(), nullable=True))
    op.add_column("memory_jobs", sa.Column("retry_after", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for name in ("retry_after", "last_error", "failures"):
        op.drop_column("memory_jobs", name)
