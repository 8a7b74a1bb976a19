"""A run's turns inserted in bulk: COPY into a staging table, then two set-based INSERT … SELECTs.

Per-row INSERTs (or one huge multi-VALUES statement) spend their time compiling and binding
parameters; COPY streams rows in one round trip, so 100,000 lines take seconds, not minutes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import cast, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.settings import DEFAULT_TENANT
from db.models import Run, RunStatus, Turn
from db.session import psycopg_connection

STAGE_COLUMNS = (
    "ord",
    "idempotency_key",
    "request_hash",
    "conversation",
    "character",
    "player_name",
    "story",
    "story_time",
    "message",
    "model",
    "params",
    "custom_id",
    "history",
    "known",
)

CREATE_STAGE = text(
    """
    CREATE TEMP TABLE turn_stage (
        ord integer, idempotency_key text, request_hash text, conversation text, character text,
        player_name text, story text, story_time integer, message text, model text, params jsonb,
        custom_id text, history jsonb, known boolean
    ) ON COMMIT DROP
    """
)

# A run never rewrites a conversation that exists; new ones take the first line that names them.
# Conversations and idempotency keys are the run's tenant's: a line never reaches another tenant's.
# Inserted in code point order (COLLATE "C"), as a producer's upsert_conversations sorts them in
# Python: in a database of another collation ("alice" before "Bob") the two created the same new
# conversations in opposite orders and could deadlock.
INSERT_CONVERSATIONS = text(
    """
    INSERT INTO conversations (tenant, external_id, character_id, player_id, player_name, story, story_time)
    SELECT DISTINCT ON (s.conversation COLLATE "C") CAST(:tenant AS varchar), s.conversation, c.id, '',
           s.player_name, s.story, s.story_time
    FROM turn_stage s JOIN characters c ON c.slug = s.character
    -- One that existed when the file was validated is never made again: gone since (an erasure, a
    -- run's retention), its line would bring back what was deleted (review of deletes racing use).
    WHERE NOT s.known
    -- A conversation that exists is not offered: ON CONFLICT would wait for any transaction writing
    -- its row (a worker storing an earlier line's reply, which then waits for this run's row).
      AND NOT EXISTS (
        SELECT 1 FROM conversations v
        WHERE v.tenant = CAST(:tenant AS varchar) AND v.external_id = s.conversation
    )
    ORDER BY s.conversation COLLATE "C", s.ord
    ON CONFLICT (tenant, external_id) DO NOTHING
    """
)

# A line may seed its fresh conversation with earlier lines (an OpenAI batch line's messages before
# the last). Seeded once: a conversation that holds messages already is left as it is.
INSERT_HISTORY = text(
    """
    INSERT INTO messages (conversation_id, seq, role, content)
    SELECT v.id, h.ord, h.item->>0, h.item->>1
    FROM turn_stage s JOIN conversations v ON v.tenant = :tenant AND v.external_id = s.conversation
    CROSS JOIN LATERAL jsonb_array_elements(s.history) WITH ORDINALITY AS h(item, ord)
    WHERE s.history IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = v.id)
    ON CONFLICT (conversation_id, seq) DO NOTHING
    """
)

INSERT_TURNS = text(
    """
    INSERT INTO turns (id, tenant, idempotency_key, request_hash, conversation_id, run_id, custom_id,
                       message, status, model, params, attempts)
    SELECT uuidv7(), :tenant, s.idempotency_key, s.request_hash, v.id, :run_id, s.custom_id, s.message,
           'queued', s.model, s.params, 0
    FROM turn_stage s LEFT JOIN conversations v ON v.tenant = :tenant AND v.external_id = s.conversation
    ORDER BY s.ord
    ON CONFLICT (tenant, idempotency_key) DO NOTHING
    RETURNING id, number
    """
)

# Lines whose conversation is gone: validated as existing, deleted since; taken out of the stage.
TAKE_OUT_GONE = text(
    """
    DELETE FROM turn_stage s
    WHERE s.known AND NOT EXISTS (
        SELECT 1 FROM conversations v WHERE v.tenant = :tenant AND v.external_id = s.conversation
    )
    RETURNING s.ord, s.custom_id, s.conversation
    """
)

ANALYZE_STAGE = text("ANALYZE turn_stage")  # temp tables have no statistics until analysed


class RunNotAccepting(RuntimeError):
    """The run left `validating` (it was cancelled): its submission stores nothing more."""


@dataclass(frozen=True)
class StagedTurn:
    """One validated run line, ready to stage."""

    idempotency_key: str
    request_hash: str
    conversation: str
    character: str | None
    player_name: str
    story: str | None
    story_time: int | None
    message: str
    model: str
    params: dict[str, Any]
    custom_id: str
    history: tuple[tuple[str, str], ...] = ()  # (role, text) seeding a fresh conversation
    known: bool = False  # its conversation existed when the file was validated: never made again
    line: int = 0  # its line in the file (0: not known), named by a refusal at storing


def insert_run_turns(
    *, session: Session, run_id: uuid.UUID, turns: Sequence[StagedTurn], tenant: str = DEFAULT_TENANT
) -> list[uuid.UUID]:
    """Insert the turns (and any new conversations, the tenant's) in the caller's transaction; returns
    the new ids.

    Turn numbers follow input order; the turns are stored unsent (no dispatched_at). A line whose
    idempotency key exists already is left as it is. Raises RunNotAccepting once the run is no
    longer being submitted (a cancel landed).
    Raises ValueError if a line's conversation neither exists nor is started by a line naming a
    character (validation catches that first; the caller's transaction then inserts nothing).
    """
    if not turns:
        return []
    # FOR SHARE until this chunk commits: a cancel (or an expiry) waits for it, then sees its turns.
    status = session.scalar(select(Run.status).where(Run.id == run_id).with_for_update(read=True))
    if status != RunStatus.VALIDATING:
        raise RunNotAccepting(f"run is {status}")
    session.execute(CREATE_STAGE)
    cursor = psycopg_connection(session).cursor()
    with cursor.copy(f"COPY turn_stage ({', '.join(STAGE_COLUMNS)}) FROM STDIN") as copy:
        for ord_, t in enumerate(turns):
            copy.write_row(
                (
                    ord_,
                    t.idempotency_key,
                    t.request_hash,
                    t.conversation,
                    t.character,
                    t.player_name,
                    t.story,
                    t.story_time,
                    t.message,
                    t.model,
                    json.dumps(t.params),
                    t.custom_id,
                    json.dumps(t.history) if t.history else None,
                    t.known,
                )
            )
    session.execute(ANALYZE_STAGE)
    session.execute(INSERT_CONVERSATIONS, {"tenant": tenant})
    if any(t.history for t in turns):
        session.execute(INSERT_HISTORY, {"tenant": tenant})
    if any(t.known for t in turns):
        _refuse_gone(session, run_id, turns, tenant)
    try:
        rows = session.execute(INSERT_TURNS, {"run_id": run_id, "tenant": tenant}).tuples().all()
    except IntegrityError as exc:  # the LEFT JOIN left conversation_id NULL: deleted meanwhile
        raise ValueError(f"a line names a conversation that does not exist: {exc.orig}") from None
    return [turn_id for turn_id, _ in sorted(rows, key=lambda row: row[1])]


def _refuse_gone(session: Session, run_id: uuid.UUID, turns: Sequence[StagedTurn], tenant: str) -> None:
    """Lines whose conversation existed when the file was validated and is gone now (the player
    erased, an earlier run's retention) are refused, as a policy's refusals are (answered failed in
    the run's error file, out of its total), and their turns not stored: stored, a line naming its
    character made the conversation again, the erased one's name holding the line and its reply,
    out of the erasure's reach (review of deletes racing use)."""
    gone = sorted(session.execute(TAKE_OUT_GONE, {"tenant": tenant}).tuples().all())
    if not gone:
        return
    records = [
        {
            "line": turns[ord_].line or None,
            "custom_id": custom_id,
            "message": f"conversation: {name!r} was deleted after the file was validated (its player "
            "erased, or its run's retention); the line is not answered",
            "param": "conversation",
        }
        for ord_, custom_id, name in gone
    ]
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(
            refused=func.coalesce(Run.refused, cast([], JSONB)).op("||")(cast(records, JSONB)),
            total=func.greatest(Run.total - len(records), 0),
        )
    )


def stored_custom_ids(*, session: Session, run_id: uuid.UUID) -> set[str]:
    """The custom_ids a run holds already (a resumed submission skips their lines)."""
    return {c for c in session.scalars(select(Turn.custom_id).where(Turn.run_id == run_id)) if c is not None}
