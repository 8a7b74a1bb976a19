"""turns (run_id, status) index → (run_id, status, id): the run advance pins a queued turn of the
run at a random id (db/runs.py), and the old index could only return them in heap order

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-30 22:30:00
"""

from collections.abc import Sequence

from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY so writes to turns go on while the index builds; it cannot run in a transaction,
    # hence the autocommit block. A rerun after an interrupted build finishes the job (the invalid
    # index it left is built again). The new index serves every query the old one did (its first two
    # columns), so the old goes.
    with op.get_context().autocommit_block():
        create_index_concurrently("ix_turns_run_status_id", "turns", ["run_id", "status", "id"])
        drop_index_concurrently("ix_turns_run_status", "turns")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        create_index_concurrently("ix_turns_run_status", "turns", ["run_id", "status"])
        drop_index_concurrently("ix_turns_run_status_id", "turns")
