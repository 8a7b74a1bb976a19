"""Current facts by scope: each scope of the facts an NPC may know is an index scan of these
partial indexes (db/facts.py), so a turn no longer reads every current fact of its tenant

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-01 03:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY, as in 0018: fact writes go on while the indexes build.
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "ix_facts_current_scope",
            "facts",
            ["tenant", "scope", "scope_ref"],
            postgresql_where=sa.text("superseded_by IS NULL"),
        )
        create_index_concurrently(
            "ix_facts_current_met",
            "facts",
            ["tenant", "player_id"],
            postgresql_where=sa.text("superseded_by IS NULL AND scope = 'met'"),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in ("ix_facts_current_met", "ix_facts_current_scope"):
            drop_index_concurrently(name, "facts")
