"""Turn deferrals: turns.deferred_since and turns.deferrals (a turn waiting for an earlier turn of its
conversation backs off, and fails past MLCHAT_ORDER_WAIT_LIMIT_S)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("deferred_since", sa.DateTime(timezone=True), nullable=True))
    op.add_column("turns", sa.Column("deferrals", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("turns", "deferrals")
    op.drop_column("turns", "deferred_since")
