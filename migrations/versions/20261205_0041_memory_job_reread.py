"""An edited line is read for facts again at once

Revision ID: 0041
Revises: 0040
Create Date: 2026-12-05 19:00:00

A writer's edit at the desk sends fact extraction back to the edited line, but extraction was due
only once MLCHAT_MEMORY_EXTRACT_EVERY_LINES unread lines had gathered: a finished conversation, whose
next line never comes, never had the edited text read, nor the lines after it whose facts the edit
dropped. `reread_through` keeps how far extraction had read: it is due until it reads that far again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0041"
down_revision: str | None = "0040"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("memory_jobs", sa.Column("reread_through", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("memory_jobs", "reread_through")
