"""The sweep's deletions past MLCHAT_RUN_RETENTION_DAYS, MLCHAT_PROMPT_RETENTION_DAYS and
MLCHAT_REQUEST_COPY_RETENTION_DAYS (db/retention.py), a chunk per transaction, within one pass's time."""

from __future__ import annotations

import time

from core.settings import settings
from db.retention import delete_request_copies, delete_run_chunk, forget_prompts, runs_past
from db.session import session_scope
from services.characters import CHAT_COPY, INLINE_COPY

PASS_S = 30.0  # one sweep's time for it: the rest waits for the next
RUNS_A_PASS = 100


def prune(deadline: float | None = None) -> dict[str, int]:
    """Delete what the settings keep no longer, until done or `deadline` (time.monotonic; None:
    PASS_S from now): {"runs": ended runs deleted whole, "prompts": live turns' prompts forgotten,
    "request_copies": conversations made for one request deleted}."""
    deadline = time.monotonic() + PASS_S if deadline is None else deadline
    done = {"runs": 0, "prompts": 0, "request_copies": 0}
    if settings.run_retention_days:
        days = settings.run_retention_days
        with session_scope() as session:
            due = runs_past(session=session, days=days, limit=RUNS_A_PASS)
        for run_id in due:
            while time.monotonic() < deadline:
                with session_scope() as session:
                    gone = delete_run_chunk(session=session, run_id=run_id, days=days)
                if gone == 0:  # the run is gone
                    done["runs"] += 1
                if not gone:  # or (None) no longer one to delete: reopened meanwhile
                    break
    if settings.prompt_retention_days:
        while time.monotonic() < deadline:
            with session_scope() as session:
                forgotten = forget_prompts(session=session, days=settings.prompt_retention_days)
            done["prompts"] += forgotten
            if not forgotten:
                break
    if settings.request_copy_retention_days:
        days = settings.request_copy_retention_days
        while time.monotonic() < deadline:
            with session_scope() as session:
                gone = delete_request_copies(
                    session=session, days=days, inline_copy=INLINE_COPY, chat_copy=CHAT_COPY
                )
            done["request_copies"] += gone
            if not gone:
                break
    return done
