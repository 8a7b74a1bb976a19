"""Engine deaths a turn was inside for without being a suspect

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-04 21:45:00

A death blamed only the requests joining the engine when it died: one that kills it mid-reply, on a
busy worker (where another request nearly always joins), was never blamed, so it was sent to worker
after worker, its attempt refunded each time. Deaths a turn was inside for are now counted too, and
after a few it runs alone, where a death is its own (worker/pipeline.py DEATHS_SEEN_ALONE).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0031"
down_revision: str | None = "0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("engine_deaths_seen", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("turns", "engine_deaths_seen")
