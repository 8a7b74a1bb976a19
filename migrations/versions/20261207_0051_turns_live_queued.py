"""Live turns still queued, by model and age: what the sweep's look for a model no worker serves reads

Revision ID: 0051
Revises: 0050
Create Date: 2026-12-07 11:00:00

Each `mlchat sweep` reads the models of the live turns queued now, and fails those of a model no
worker has served for MLCHAT_UNSERVED_MODEL_FAIL_S, oldest first (services/sweeper.py). Without an
index the second read walked `turns` in id order past every bulk line queued (a large batch's
backlog) to find them.
"""

from collections.abc import Sequence

from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0051"
down_revision: str | None = "0050"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY, as in 0045: turns are written while the service runs.
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "ix_turns_live_queued",
            "turns",
            ["model", "created_at"],
            postgresql_where="status = 'queued' AND run_id IS NULL",
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_turns_live_queued", "turns")
