"""Per-turn callbacks: turns.callback_url (POST /v1/turns), POSTed the stored turn when it ends,
with its delivery bookkeeping (attempts, delivered_at, last error) as runs keep theirs

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("turns", sa.Column("callback_attempts", sa.Integer(), server_default="0", nullable=False))
    op.add_column("turns", sa.Column("callback_delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("turns", sa.Column("callback_error", sa.Text(), nullable=True))


def downgrade() -> None:
    for name in ("callback_error", "callback_delivered_at", "callback_attempts", "callback_url"):
        op.drop_column("turns", name)
