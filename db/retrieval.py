"""Retrieval for a whole batch in one round trip: recent history, similar past lines, story events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.vector_space import SAME_SPACE_SQL
from db.vectors import VectorArray, send_vectors_binary

if TYPE_CHECKING:
    from db.facts import FactHit
    from db.summaries import SummaryLine

# One statement, LATERAL per query row. History similarity is exact (btree on (conversation_id, seq)
# narrows to one conversation, then distances are computed); story events go through the story's
# partition of the HNSW index (run-time partition pruning), filtered by story and story time.
# Lines inside the recent window are not "retrieved": they are in the prompt already. A connection
# of another embedder than the stored vectors' (db/vector_space.py) gets recent lines only.
_BATCH_CONTEXT_SQL = text(
    """
WITH q AS (
    SELECT idx, conversation_id, vec, story, story_time, SAME_SPACE AS same_space
    FROM unnest(CAST(:idx AS int[]), CAST(:conv AS bigint[]), CAST(:vec AS vector[]),
                CAST(:story AS text[]), CAST(:story_time AS int[]))
         AS t(idx, conversation_id, vec, story, story_time)
),
last_seq AS (
    SELECT q.idx,
           COALESCE((SELECT max(seq) FROM messages m WHERE m.conversation_id = q.conversation_id), 0) AS seq
    FROM q
)
SELECT 'recent' AS kind, q.idx, r.id, r.role, r.content, r.seq AS pos, NULL::float8 AS distance,
       NULL AS scene, r.speaker_id, r.speaker_name
FROM q CROSS JOIN LATERAL (
    SELECT id, role, content, seq, speaker_id, speaker_name FROM messages m
    WHERE m.conversation_id = q.conversation_id
    ORDER BY seq DESC LIMIT :recent_n
) r
UNION ALL
SELECT 'similar', q.idx, s.id, s.role, s.content, s.seq, s.distance, NULL, s.speaker_id, s.speaker_name
FROM q JOIN last_seq l USING (idx) CROSS JOIN LATERAL (
    SELECT id, role, content, seq, speaker_id, speaker_name, m.embedding <=> q.vec AS distance FROM messages m
    WHERE q.same_space AND m.conversation_id = q.conversation_id AND m.embedding IS NOT NULL
      AND m.seq <= l.seq - :recent_n
    ORDER BY distance LIMIT :history_k
) s
UNION ALL
SELECT 'event', q.idx, e.id, NULL, e.text, e.time, e.distance, e.scene, NULL::int, NULL
FROM q CROSS JOIN LATERAL (
    SELECT id, text, time, scene, ev.embedding <=> q.vec AS distance FROM story_events ev
    WHERE q.same_space AND ev.story = q.story AND (q.story_time IS NULL OR ev.time <= q.story_time)
    ORDER BY ev.embedding <=> q.vec LIMIT :story_k
) e
""".replace("SAME_SPACE", SAME_SPACE_SQL)
)


# For this transaction only. story_events is partitioned by story (migration 0014), so the scan
# searches the story's own graph; the story-time filter still drops some of what it visits, and
# pgvector 0.8's iterative scan keeps scanning until enough rows pass instead of returning fewer
# than k. Relaxed order is fine: hits are re-sorted by score below. A custom plan per execution:
# psycopg prepares a statement run five times, and PostgreSQL's generic plan for it, not knowing
# LIMIT :story_k, sorts whole partitions exactly (measured: 2-4x slower than the index).
_HNSW_SETTINGS = text(
    "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true),"
    " set_config('hnsw.ef_search', :ef_search, true),"
    " set_config('plan_cache_mode', 'force_custom_plan', true)"
)


@dataclass(frozen=True)
class ContextQuery:
    """What one turn retrieves for: its conversation, story position and embedded message."""

    conversation_id: int
    story: str | None
    story_time: int | None
    vector: np.ndarray


@dataclass(frozen=True)
class HistoryLine:
    id: int
    role: str
    content: str
    seq: int
    score: float | None = None  # cosine similarity, for retrieved lines
    # In a group conversation, the member who said it and its name as spoken (None: the player).
    speaker_id: int | None = None
    speaker_name: str | None = None


@dataclass(frozen=True)
class EventHit:
    id: int
    scene: str
    text: str
    time: int
    score: float


@dataclass
class TurnContext:
    """Retrieved context of one turn; recent oldest first, retrieved best first."""

    recent: list[HistoryLine] = field(default_factory=list)
    similar: list[HistoryLine] = field(default_factory=list)
    events: list[EventHit] = field(default_factory=list)
    # NPC memory (db/summaries.py, db/facts.py): summaries oldest first, facts best first.
    summaries: list[SummaryLine] = field(default_factory=list)
    facts: list[FactHit] = field(default_factory=list)


def fetch_batch_context(
    *,
    session: Session,
    queries: Sequence[ContextQuery],
    recent_n: int,
    history_k: int,
    story_k: int,
    ef_search: int = 64,
) -> list[TurnContext]:
    """Retrieve every turn's context with a single statement; one TurnContext per query, in order."""
    contexts = [TurnContext() for _ in queries]
    if not queries:
        return contexts
    params = dict(
        idx=list(range(len(queries))),
        conv=[q.conversation_id for q in queries],
        vec=VectorArray(q.vector for q in queries),
        story=[q.story for q in queries],
        story_time=[q.story_time for q in queries],
        recent_n=recent_n,
        history_k=history_k,
        story_k=story_k,
    )
    send_vectors_binary(session)
    session.execute(_HNSW_SETTINGS, {"ef_search": str(ef_search)})
    rows = session.execute(_BATCH_CONTEXT_SQL, params).all()  # one fetch, not a fetchone per row
    for kind, idx, row_id, role, content, pos, distance, scene, speaker_id, speaker_name in rows:
        ctx = contexts[idx]
        if kind == "recent":
            ctx.recent.append(HistoryLine(row_id, role, content, pos, None, speaker_id, speaker_name))
        elif kind == "similar":
            ctx.similar.append(
                HistoryLine(row_id, role, content, pos, 1.0 - distance, speaker_id, speaker_name)
            )
        else:
            ctx.events.append(EventHit(row_id, scene, content, pos, 1.0 - distance))
    for ctx in contexts:
        ctx.recent.sort(key=lambda line: line.seq)
        ctx.similar.sort(key=lambda line: -(line.score or 0.0))
        ctx.events.sort(key=lambda hit: -hit.score)
    return contexts
