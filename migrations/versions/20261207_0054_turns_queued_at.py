"""When a turn was last put in line by its sender: what its queue time is counted from

Revision ID: 0054
Revises: 0053
Create Date: 2026-12-07 16:00:00

`queue_ms` and `total_ms` ran from the turn's insert across every earlier attempt: a run's failed
lines retried a day later showed a day in the queue. `queued_at` is the insert, moved by each fresh
start (a retry of failed lines, a failed unsent turn sent again, a scene's step started over); a
hand-back after a worker's death keeps it (the player is still waiting). Rows before this revision
keep NULL and count from `created_at` as before; the default is metadata only, no table rewrite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0054"
down_revision: str | None = "0053"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
    # Set apart from the ADD: the rows already there keep NULL, not this revision's time.
    op.alter_column("turns", "queued_at", server_default=sa.func.now())


def downgrade() -> None:
    op.drop_column("turns", "queued_at")
