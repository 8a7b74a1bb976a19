"""Deleted files keep their place in the files list

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-05 16:00:00

A files list is paged from the last file of the page before (`after`), found by its row: a file
deleted (by its owner, an admin, or the expiry sweep) between two pages made the next page a 400,
and the `openai` client's paginator, which deletes as it lists, stopped there. A deleted file leaves
its id, owner and creation time behind for a week, which a page can start past.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0038"
down_revision: str | None = "0037"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "file_tombstones",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("api_key", sa.String(64), nullable=True),
        sa.Column("tenant", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_file_tombstones_deleted_at", "file_tombstones", ["deleted_at"])


def downgrade() -> None:
    op.drop_table("file_tombstones")
