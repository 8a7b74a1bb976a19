"""Tenants: conversations, turns and runs carry the tenant of the API key that made them; external
conversation ids and idempotency keys are unique per tenant, not globally.

Existing rows: a run takes its key's id (the default tenant of a key), or '' (the CLI's tenant); a
turn takes its run's tenant, else its key's id, else ''; a conversation takes the tenant of its
first turn, else ''. Keys given an explicit `tenant` later see only rows of that tenant.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.util.exc import CommandError

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ('conversations', 'turns', 'runs'):
        op.add_column(table, sa.Column('tenant', sa.String(length=64), server_default='', nullable=False))
    op.execute('UPDATE runs SET tenant = api_key WHERE api_key IS NOT NULL')
    op.execute('UPDATE turns t SET tenant = r.tenant FROM runs r WHERE r.id = t.run_id')
    op.execute('UPDATE turns SET tenant = api_key WHERE run_id IS NULL AND api_key IS NOT NULL')
    op.execute(
        'UPDATE conversations c SET tenant = first.tenant FROM ('
        ' SELECT DISTINCT ON (conversation_id) conversation_id, tenant FROM turns'
        ' ORDER BY conversation_id, number) AS first '
        "WHERE first.conversation_id = c.id AND first.tenant <> ''"
    )
    op.drop_constraint('uq_conversations_external_id', 'conversations', type_='unique')
    op.create_unique_constraint(
        'uq_conversations_tenant_external_id', 'conversations', ['tenant', 'external_id']
    )
    op.drop_constraint('uq_turns_idempotency_key', 'turns', type_='unique')
    op.create_unique_constraint('uq_turns_tenant_idempotency_key', 'turns', ['tenant', 'idempotency_key'])


def downgrade() -> None:
    # One name can no longer be held by two tenants: said in one line before anything changes (it was
    # PostgreSQL's unique violation, a traceback, halfway through). An offline script reads no rows.
    shared = {} if op.get_context().as_sql else {
        what: op.get_bind().scalar(
            sa.text(f'SELECT count(*) FROM (SELECT 1 FROM {table} GROUP BY {column} HAVING count(*) > 1) d')
        )
        for what, table, column in (
            ('conversation ids', 'conversations', 'external_id'),
            ('idempotency keys', 'turns', 'idempotency_key'),
        )
    }
    if any(shared.values()):
        said = ' and '.join(f'{n} {what}' for what, n in shared.items() if n)
        raise CommandError(
            f'0008 cannot be undone: {said} are held by more than one tenant, which before 0008 could '
            'not be; erase or rename them first'
        )
    op.drop_constraint('uq_turns_tenant_idempotency_key', 'turns', type_='unique')
    op.create_unique_constraint('uq_turns_idempotency_key', 'turns', ['idempotency_key'])
    op.drop_constraint('uq_conversations_tenant_external_id', 'conversations', type_='unique')
    op.create_unique_constraint('uq_conversations_external_id', 'conversations', ['external_id'])
    for table in ('runs', 'turns', 'conversations'):
        op.drop_column(table, 'tenant')
