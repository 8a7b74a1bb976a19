"""An index of runs by status, for housekeeping's looks

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-04 22:00:00

Every worker's housekeeping looks for runs by status every few seconds (due to expire, finalizing, a
batch's submission due again, an abandoned submission, a cancel to finish), and runs are kept for
good: with only the primary key and the name's index, each look read the whole table.
"""

from collections.abc import Sequence

from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0032"
down_revision: str | None = "0031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        create_index_concurrently("ix_runs_status_expires_at", "runs", ["status", "expires_at"])


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_runs_status_expires_at", "runs")
