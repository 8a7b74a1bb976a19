"""A memory job counts the engine deaths its request was inside

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-02 22:20:00

A summary or extraction request that crashes the engine was sent again to the next worker, which
died the same way (seeded, greedy for JSON: the same request), and each death was also counted
against the live turns beside it. The job's step now runs without the model once its request was
inside an engine that died (memory/summarize.py, memory/extract.py), and the count clears when a
step is stored.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "memory_jobs", sa.Column("engine_deaths", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    op.drop_column("memory_jobs", "engine_deaths")
