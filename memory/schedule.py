"""After replies are stored, a line is edited at the desk, or a sweep finds a job's message lost:
send the memory jobs that are due to the bulk lane (at most one of each
kind per conversation in flight, and one or two on the queue: a job is sent only when its queued
mark is taken, db/memory_jobs.py; the job's claim makes a duplicate message harmless)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select

from core.settings import settings
from db.memory_jobs import (
    EXTRACT,
    SUMMARY,
    extract_due,
    mark_queued,
    retry_given_up,
    take_back_stalled,
    unmark_queued,
)
from db.models import Conversation
from db.session import session_scope
from db.summaries import conversations_due
from memory.summary_room import summaries_room
from services.characters import CHAT_COPY, INLINE_COPY

logger = logging.getLogger(__name__)


def switched_on() -> set[str]:
    """The kinds of memory job the settings run (0 switches summaries or extraction off)."""
    on = {SUMMARY} if settings.memory_summary_threshold_tokens > 0 else set()
    return on | ({EXTRACT} if settings.memory_extract_every_lines > 0 else set())


def due_jobs(conversation_ids: Sequence[int]) -> list[tuple[int, str]]:
    """(conversation id, kind) of every memory job due for these conversations."""
    ids = sorted(set(conversation_ids))
    if not ids:
        return []
    jobs: list[tuple[int, str]] = []
    with session_scope() as session:
        # The copy of its history a request of the original shape without a conversation is
        # answered in (services/original_request.py), and a chat completion's that named none, are
        # never continued: no memory for them, or every such request would summarise its whole
        # history again on the bulk lane (review, stop 76: the chat completion's was missed).
        ids = list(
            session.scalars(
                select(Conversation.id).where(
                    Conversation.id.in_(ids),
                    ~Conversation.external_id.regexp_match(INLINE_COPY),
                    ~Conversation.external_id.regexp_match(CHAT_COPY),
                )
            )
        )
        if not ids:
            return []
        kinds = switched_on()
        if SUMMARY in kinds:
            jobs += [
                (c, SUMMARY)
                for c in conversations_due(
                    session=session,
                    conversation_ids=ids,
                    recent_n=settings.recent_history,
                    threshold_tokens=settings.memory_summary_threshold_tokens,
                    fanout=settings.memory_summary_fanout,
                    budget_tokens=summaries_room(),
                )
            ]
        if EXTRACT in kinds:
            jobs += [
                (c, EXTRACT)
                for c in extract_due(
                    session=session, conversation_ids=ids, every_lines=settings.memory_extract_every_lines
                )
            ]
    return jobs


def schedule_memory(conversation_ids: Sequence[int]) -> int:
    """Send the due memory jobs; how many were sent. Never raises (memory can wait for the next turn)."""
    marked: list[tuple[int, str]] = []
    try:
        jobs = due_jobs(conversation_ids)
        if jobs:
            with session_scope() as session:
                marked = mark_queued(session=session, jobs=jobs, stale_s=settings.memory_job_lease_s)
        if marked:
            from tasks.memory import send_memory_jobs

            send_memory_jobs(marked)
        return len(marked)
    except Exception:
        logger.warning(
            "could not schedule memory jobs for %d conversations", len(conversation_ids), exc_info=True
        )
        unmark_jobs(marked)
        return 0


def unmark_jobs(jobs: list[tuple[int, str]]) -> None:
    """Take back the marks of jobs whose send failed (some may have gone out: a duplicate is
    harmless): the next sweep, or the conversation's next reply, sends them. A job its step released
    has no mark to lapse, so without this one whose hand-on failed waited for a reply that may never
    come."""
    if not jobs:
        return
    try:
        with session_scope() as session:
            unmark_queued(session=session, jobs=jobs)
    # The database away too: the marks lapse after a lease, and `mlchat sweep` finds them then.
    except Exception:
        logger.warning("could not take back the queued marks of %d memory jobs", len(jobs), exc_info=True)


def reschedule_stalled(limit: int = 1000) -> int:
    """Send again the memory jobs whose messages went missing (a broker lost them, a worker died
    holding one); how many were sent (`mlchat sweep`). Raises when they cannot be sent (the sweep
    says so); their marks lapse and the next sweep finds them again."""
    # Only the kinds switched on, and none given up: taken back and never sent, they were marked
    # again at every sweep and filled its limit ahead of the jobs that run (found in review).
    with session_scope() as session:
        stalled = take_back_stalled(
            session=session,
            lease_s=settings.memory_job_lease_s,
            limit=limit,
            kinds=sorted(switched_on()),
            max_failures=settings.memory_job_max_failures,
        )
    if stalled:
        from tasks.app import within_visibility
        from tasks.memory import send_memory_jobs

        for wait_s in sorted({wait for _, _, wait in stalled}):  # a dead worker's job backs off
            jobs = [(conversation, kind) for conversation, kind, wait in stalled if wait == wait_s]
            send_memory_jobs(jobs, countdown=within_visibility(wait_s) if wait_s else None)
    return len(stalled)


def retry_given_up_jobs() -> list[tuple[int, str, str | None]]:
    """Give the memory jobs given up after MLCHAT_MEMORY_JOB_MAX_FAILURES failures in a row another
    go, each sent now if it is still due (`mlchat memory retry`); (conversation id, kind, its last
    error) of each."""
    with session_scope() as session:
        jobs = retry_given_up(session=session, max_failures=settings.memory_job_max_failures)
    if jobs:
        schedule_memory([conversation for conversation, _, _ in jobs])
    return jobs
