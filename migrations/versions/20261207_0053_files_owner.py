"""Files by their owner's key, newest or oldest first: what listing a key's files and its quota read

Revision ID: 0053
Revises: 0052
Create Date: 2026-12-07 13:15:00

`files` had its primary key and the expiry index alone: every `GET /v1/files` read and sorted every
file of every key, and every upload and batch creation summed every file's bytes under the key's
quota lock (one key's uploads queued behind that scan). Review at fleet scale: a million files.
"""

from collections.abc import Sequence

from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0053"
down_revision: str | None = "0052"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY, as in 0045: uploads and finalizing batches write files while the service runs.
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "ix_files_owner_created",
            "files",
            ["api_key", "created_at", "id"],
            postgresql_include=["bytes", "tenant"],
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_files_owner_created", "files")
