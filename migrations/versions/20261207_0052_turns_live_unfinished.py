"""Live turns unfinished, by model and number: what the sweep's look for lost live messages reads

Revision ID: 0052
Revises: 0051
Create Date: 2026-12-07 13:00:00

Each `mlchat sweep` looks for the stranded live turns of each model, oldest first
(services/sweeper.py::resend_stranded). The only index that fitted was `ix_turns_unfinished` (number,
every unfinished turn): the model and the lane were checked row by row, so a player's lost turn was
found only after reading every bulk line of every model still waiting (a large batch's backlog: a
million rows a sweep). Review at fleet scale.
"""

from collections.abc import Sequence

from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0052"
down_revision: str | None = "0051"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY, as in 0045: turns are written while the service runs.
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "ix_turns_live_unfinished",
            "turns",
            ["model", "number"],
            postgresql_where="status IN ('queued', 'running') AND run_id IS NULL",
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_turns_live_unfinished", "turns")
