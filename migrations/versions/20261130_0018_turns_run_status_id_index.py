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
    # The new index serves every query the old one did (its first two columns), so the old goes.
    op.create_index("ix_turns_run_status_id", "turns", ["run_id", "status", "id"], unique=False)
    op.drop_index("ix_turns_run_status", table_name="turns")


def downgrade() -> None:
    op.create_index("ix_turns_run_status", "turns", ["run_id", "status"], unique=False)
    op.drop_index("ix_turns_run_status_id", table_name="turns")
