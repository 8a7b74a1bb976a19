"""turns (run_id, status) index → (run_id, status, id): the run advance pins a queued turn of the
run at a random id (db/runs.py), and the old index could only return them in heap order

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-30 22:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY so writes to turns go on while the index builds (migrations run at start-up); it
    # cannot run in a transaction, hence the autocommit block. IF (NOT) EXISTS makes a rerun after an
    # interrupted build finish the job (an interrupted build leaves an invalid index: drop it by hand).
    # The new index serves every query the old one did (its first two columns), so the old goes.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_turns_run_status_id",
            "turns",
            ["run_id", "status", "id"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index("ix_turns_run_status", table_name="turns", postgresql_concurrently=True, if_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_turns_run_status",
            "turns",
            ["run_id", "status"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_turns_run_status_id", table_name="turns", postgresql_concurrently=True, if_exists=True
        )
