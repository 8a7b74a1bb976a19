"""The vector space's version: a connection that names the version its process's embedder weights
were checked against stores no vector once the space has moved on

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-02 18:00:00

Migration 0020's guard compares embedder names, which is all a connection can know cheaply. A
re-embed to other weights under the same name (a fine-tuned copy at the same path) left every
process of the old weights writing vectors beside the new ones until it noticed (a worker at its
next housekeeping tick, an API or CLI process never). `mlchat reembed`'s swap now bumps `version`
when the name or the weights change; a process names, in `mlchat.space_version`, the version it
checked its weights against (db/session.py), and the guard stores as NULL a vector written under
another version, as it does one of another name. A connection that names no version (a process
that has not checked yet, psql, migrations) is guarded by name only, as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GUARD = """
CREATE OR REPLACE FUNCTION mlchat_vector_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mine text := nullif(current_setting('mlchat.embedder', true), '');
    my_version text := nullif(current_setting('mlchat.space_version', true), '');
    recorded record;
BEGIN
    IF NEW.embedding IS NOT NULL AND mine IS NOT NULL THEN
        SELECT embedder, version INTO recorded FROM vector_space;
        IF FOUND AND (
            recorded.embedder <> mine
            OR recorded.version::text <> coalesce(my_version, recorded.version::text)
        ) THEN
            NEW.embedding := NULL;
        END IF;
    END IF;
    RETURN NEW;
END $$
"""

NAME_ONLY_GUARD = """
CREATE OR REPLACE FUNCTION mlchat_vector_guard() RETURNS trigger LANGUAGE plpgsql AS $$
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
    # A sequence, not a counter on the row: a record deleted and made again (by hand, or a database
    # emptied and re-seeded) never gives a process's old number to other weights.
    op.execute("CREATE SEQUENCE vector_space_version_seq AS bigint")
    op.add_column(
        "vector_space",
        sa.Column(
            "version",
            sa.BigInteger(),
            server_default=sa.text("nextval('vector_space_version_seq')"),
            nullable=False,
        ),
    )
    op.execute(GUARD)


def downgrade() -> None:
    op.execute(NAME_ONLY_GUARD)
    op.drop_column("vector_space", "version")
    op.execute("DROP SEQUENCE vector_space_version_seq")
