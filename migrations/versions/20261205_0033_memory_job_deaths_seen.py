"""Engine deaths a memory job's request was inside for without being a suspect

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-05 00:40:00

A memory job's request that kills the engine mid-reply, on a busy worker (where another request
nearly always joins), was never blamed: only a suspect's death counted toward the job going on
without the model. Deaths it was inside for are counted too, and after a few it runs alone, where a
death is its own (memory/summarize.py, memory/extract.py), as turns do (migration 0031).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0033"
down_revision: str | None = "0032"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "memory_jobs", sa.Column("engine_deaths_seen", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    op.drop_column("memory_jobs", "engine_deaths_seen")
