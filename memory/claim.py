"""A memory job's claim kept alive while the job runs: its lease renewed from a thread, as a batch's
turns' are (worker/lease.py), so a generation waiting behind live work is not taken for a dead
worker's and handed to another (whose answer would then be thrown away in turn)."""

from __future__ import annotations

import uuid

from core.settings import settings
from db.memory_jobs import renew_job
from worker.lease import LeaseKeeper


def keeping(conversation_id: int, kind: str, token: uuid.UUID) -> LeaseKeeper:
    """`with keeping(conversation, kind, token): ...` renews the job's lease until the block ends, no
    longer than the broker's visibility timeout in all (a hung worker lets its job go in the end)."""
    lease_s = settings.memory_job_lease_s
    return LeaseKeeper(
        token,
        lease_s,
        settings.visibility_timeout,
        renew=lambda session: renew_job(
            session=session, conversation_id=conversation_id, kind=kind, token=token, lease_s=lease_s
        ),
    )
