"""The embedder every stored vector comes from (vector_space, one row), and a guard that keeps a
process of another embedder from writing vectors into it

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-01 03:30:00

A process names its embedder in the connection setting `mlchat.embedder` (db/session.py); the
trigger runs only for a vector written by a connection that names one. A vector
written into messages, story_events or facts by a connection whose embedder is not the recorded
one is stored as NULL (the line is kept; `mlchat reembed` gives it a vector later), so a worker
still running the old embedder after a re-embed's swap cannot mix two models' vectors. Connections
that name no embedder (psql, migrations) are not guarded.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("messages", "story_events", "facts")

GUARD = """
CREATE FUNCTION mlchat_vector_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mine text := nullif(current_setting('mlchat.embedder', true), '');
    recorded text;
BEGIN
    IF NEW.embedding IS NOT NULL AND mine IS NOT NULL THEN
        SELECT embedder INTO recorded FROM vector_space;
        IF recorded IS NOT NULL AND recorded <> mine THEN
            NEW.embedding := NULL;
        END IF;
    END IF;
    RETURN NEW;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "vector_space",
        sa.Column("id", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("embedder", sa.Text(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("id", name=op.f("ck_vector_space_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vector_space")),
    )
    op.execute(GUARD)
    for table in TABLES:
        op.execute(
            f"CREATE TRIGGER vector_guard BEFORE INSERT OR UPDATE OF embedding ON {table} FOR EACH ROW"
            " WHEN (NEW.embedding IS NOT NULL AND current_setting('mlchat.embedder', true) <> '')"
            " EXECUTE FUNCTION mlchat_vector_guard()"
        )


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"DROP TRIGGER vector_guard ON {table}")
    op.execute("DROP FUNCTION mlchat_vector_guard()")
    op.drop_table("vector_space")
