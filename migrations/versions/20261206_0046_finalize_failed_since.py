"""Runs record since when their finalizing has failed

Revision ID: 0046
Revises: 0045
Create Date: 2026-12-06 19:15:00

A batch whose output files cannot be written (a line that never serialises, a folder refused for
good) was put back in line at every housekeeping pass for ever: its client never heard. The first
failure's time is kept, and past MLCHAT_FINALIZE_GIVE_UP_HOURS of failures the batch fails with the
last reason.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0046"
down_revision: str | None = "0045"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("finalize_failed_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "finalize_failed_since")
