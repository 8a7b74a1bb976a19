"""What the sweep's retention reads: live turns that still hold their rendered prompt, by when they
finished; conversations made for one request, by when they were made

Revision ID: 0049
Revises: 0048
Create Date: 2026-12-07 07:00:00

The sweep forgets a finished live turn's prompt, context manifest and unpicked candidates once
MLCHAT_PROMPT_RETENTION_DAYS have passed (db/retention.py::forget_prompts), a chunk at a time: the
first index finds the oldest that still hold one, and each turn leaves it once forgotten (without
it, each chunk read the table from its start, past every turn forgotten before). The second finds
the conversations an original-shape request naming none was answered in (`inline-<32 hex>-<12
hex>`), which MLCHAT_REQUEST_COPY_RETENTION_DAYS deletes.
"""

from collections.abc import Sequence

from alembic import op

from migrations.concurrent_index import create_index_concurrently, drop_index_concurrently

revision: str = "0049"
down_revision: str | None = "0048"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY, as in 0045: turns are written while the service runs.
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "ix_turns_prompt_kept",
            "turns",
            ["finished_at"],
            postgresql_where="run_id IS NULL AND prompt IS NOT NULL",
        )
        create_index_concurrently(
            "ix_conversations_request_copies",
            "conversations",
            ["created_at"],
            postgresql_where="external_id ~ '^inline-[0-9a-f]{32}-[0-9a-f]{12}$'",
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        drop_index_concurrently("ix_conversations_request_copies", "conversations")
        drop_index_concurrently("ix_turns_prompt_kept", "turns")
