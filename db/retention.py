"""What the deployment keeps for a limited time (MLCHAT_RUN_RETENTION_DAYS,
MLCHAT_PROMPT_RETENTION_DAYS, MLCHAT_REQUEST_COPY_RETENTION_DAYS; 0 keeps it for good): an ended
run's rows, a finished live turn's rendered prompt, context manifest and unpicked candidates, and
the conversations made for one request. Each statement does a bounded chunk, so
a sweep deletes a million-line run over many short transactions, never one that holds its tables."""

from __future__ import annotations

import uuid

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from db.models import RUN_FINISHED, Run, Turn

CHUNK = 2000


def runs_past(*, session: Session, days: int, limit: int) -> list[uuid.UUID]:
    """Runs that ended more than `days` ago, oldest first (read from the index by creation time: a
    run ends after it is created)."""
    cutoff = text("now() - make_interval(days => :days)").bindparams(days=days)
    return list(
        session.scalars(
            select(Run.id)
            .where(Run.created_at < cutoff, Run.status.in_(RUN_FINISHED), Run.finished_at < cutoff)
            .order_by(Run.created_at, Run.id)
            .limit(limit)
        )
    )


# The conversations a run made for its lines (services/runs/line_keys.py: `run:<name>:<custom_id>`,
# or that name's digest when too long) that no turn of anything else is in: with them go their lines,
# vectors, scenes and the run's turns in them. A conversation a line named (a game's own) is kept,
# its lines with it; the run's turns in it go with the run.
_DELETE_RUN_CONVERSATIONS = text(
    """
DELETE FROM conversations WHERE id IN (
  SELECT DISTINCT c.id FROM turns t JOIN conversations c ON c.id = t.conversation_id
  WHERE t.run_id = :run
    AND (c.external_id LIKE 'run:' || :prefix || ':%' OR c.external_id LIKE 'sha256:%')
    AND NOT EXISTS (
      SELECT 1 FROM turns o WHERE o.conversation_id = c.id AND o.run_id IS DISTINCT FROM :run
    )
  LIMIT :chunk
)
"""
)
_DELETE_RUN_TURNS = text(
    "DELETE FROM turns WHERE id IN (SELECT id FROM turns WHERE run_id = :run LIMIT :chunk)"
)


def delete_run_chunk(*, session: Session, run_id: uuid.UUID, days: int) -> int | None:
    """delete: a chunk of an ended run past `days`: its own conversations first, then its other
    turns, then the run itself; how many rows went (0: the run is gone), or None when the run is no
    longer one to delete (reopened by a retry meanwhile: its row is locked here, as a retry locks it)."""
    cutoff = text("now() - make_interval(days => :days)").bindparams(days=days)
    run = session.execute(
        select(Run.id, Run.name)
        .where(Run.id == run_id, Run.status.in_(RUN_FINISHED), Run.finished_at < cutoff)
        .with_for_update()
    ).one_or_none()
    if run is None:
        return None
    prefix = run.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    gone = session.execute(
        _DELETE_RUN_CONVERSATIONS, {"run": run_id, "prefix": prefix, "chunk": CHUNK}
    ).rowcount  # type: ignore[attr-defined]
    if not gone:
        gone = session.execute(_DELETE_RUN_TURNS, {"run": run_id, "chunk": CHUNK}).rowcount  # type: ignore[attr-defined]
    if not gone:
        session.execute(text("DELETE FROM runs WHERE id = :run"), {"run": run_id})
    return int(gone)


def forget_prompts(*, session: Session, days: int) -> int:
    """forget: a chunk of live turns finished more than `days` ago lose their rendered prompt, context
    manifest and unpicked candidates (the reply, its line, usage, scores and timings stay); how many."""
    cutoff = text("now() - make_interval(days => :days)").bindparams(days=days)
    kept = (
        select(Turn.id)
        .where(Turn.run_id.is_(None), Turn.prompt.is_not(None), Turn.finished_at < cutoff)
        .limit(CHUNK)
        .with_for_update(skip_locked=True)
    )
    return int(
        session.execute(
            update(Turn)
            .where(Turn.id.in_(kept.scalar_subquery()))
            .values(prompt=None, context=None, alternatives=None)
        ).rowcount  # type: ignore[attr-defined]
    )


# A conversation made for one request, never continued (its one turn, at most): the copy of its
# history an original-shape request naming none is answered in (`inline-<32 hex>-<12 hex>`), and a
# chat completion's naming none (`chat-<uuid>`). Not the history it was copied from (`inline-<32
# hex>`): another request of that history may be copying it now.
_DELETE_REQUEST_COPIES = text(
    """
DELETE FROM conversations WHERE id IN (
  SELECT c.id FROM conversations c
  WHERE (c.external_id LIKE 'inline-%' OR c.external_id LIKE 'chat-%')
    AND c.created_at < now() - make_interval(days => :days)
    AND (c.external_id ~ :inline_copy OR c.external_id ~ :chat_copy)
    AND (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id) <= 1
    AND NOT EXISTS (
      SELECT 1 FROM turns t WHERE t.conversation_id = c.id
        AND (t.finished_at IS NULL OR t.finished_at >= now() - make_interval(days => :days))
    )
  ORDER BY c.created_at
  LIMIT :chunk
  FOR UPDATE OF c SKIP LOCKED
)
"""
)


def delete_request_copies(*, session: Session, days: int, inline_copy: str, chat_copy: str) -> int:
    """delete: a chunk of conversations made for one request (matching `inline_copy` or `chat_copy`),
    made more than `days` ago, whose turn (if any) finished that long ago; how many."""
    params = {"days": days, "inline_copy": inline_copy, "chat_copy": chat_copy, "chunk": CHUNK}
    return int(session.execute(_DELETE_REQUEST_COPIES, params).rowcount)  # type: ignore[attr-defined]
