"""Memory jobs count the steps a database outage or a deadlock failed

Revision ID: 0044
Revises: 0043
Create Date: 2026-12-06 07:30:00

A memory job's step that failed because the database went away, or because its deadlock outlasted
its tries, is sent again without counting as the job's failure, as a turn has its outage refunded;
`outage_retries` counts those since its last stored step, and past MLCHAT_MAX_OUTAGE_REFUNDS they
count again (a deadlock every time is a bug, not an outage).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0044"
down_revision: str | None = "0043"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("memory_jobs", sa.Column("outage_retries", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("memory_jobs", "outage_retries")
