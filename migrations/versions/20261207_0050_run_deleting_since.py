"""A run whose deletion past MLCHAT_RUN_RETENTION_DAYS has begun is marked

Revision ID: 0050
Revises: 0049
Create Date: 2026-12-07 10:00:00

A large run is deleted over many transactions, often over many sweeps. Unmarked, it was taken for a
whole run meanwhile: a writer's edit on the desk rewrote its batch's output file from the half still
there, and the verdict it recorded kept the run, half deleted, for good; a retry of its failed lines
reopened it. The first chunk of its deletion marks it; what would change it then refuses it, and
the sweeps finish it first (its partial index: each sweep looks, retention on or off).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0050"
down_revision: str | None = "0049"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("deleting_since", sa.DateTime(timezone=True), nullable=True))
    # Each sweep looks for them first, retention on or off: none but those begun are in the index.
    op.create_index(
        "ix_runs_deleting_since", "runs", ["deleting_since"], postgresql_where=sa.text("deleting_since IS NOT NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_runs_deleting_since", table_name="runs")
    op.drop_column("runs", "deleting_since")
