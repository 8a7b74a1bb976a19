"""Retrieval for a whole batch in one round trip: recent history, similar past lines, story events."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import URL, Engine, create_engine, text
from sqlalchemy.orm import Session

from core.settings import settings
from db.session import CONNECT_ARGS, keep_server_alive
from db.vector_space import SAME_SPACE_SQL
from db.vectors import VectorArray, send_vectors_binary

if TYPE_CHECKING:
    from db.facts import FactHit
    from db.summaries import SummaryLine

# One statement, LATERAL per query row. History similarity is exact (btree on (conversation_id, seq)
# narrows to the conversation's last `history_scan` lines before the recent window, then distances
# are computed: a conversation of 100k lines would otherwise read them all every turn); story
# events go through the story's partition of the HNSW index (run-time partition pruning), filtered
# by story and story time.
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
      AND m.seq <= l.seq - :recent_n AND m.seq > l.seq - :recent_n - :history_scan
    ORDER BY distance LIMIT :history_k
) s
UNION ALL
SELECT 'event', q.idx, e.id, NULL, e.text, e.time, e.distance, e.scene, NULL::int, NULL
FROM q CROSS JOIN LATERAL (
    SELECT id, text, time, scene, ev.embedding <=> q.vec AS distance FROM story_events ev
    WHERE q.same_space AND ev.story = q.story AND ev.embedding IS NOT NULL
      AND (q.story_time IS NULL OR ev.time <= q.story_time)
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
_HNSW_SETTINGS_SQL = (
    "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true),"
    " set_config('hnsw.ef_search', :ef_search, true),"
    " set_config('plan_cache_mode', 'force_custom_plan', true)"
)
_HNSW_SETTINGS = text(_HNSW_SETTINGS_SQL)
# Sliced (connections > 1): the caller's connection also says which embedder and space version it
# names, and each slice's connection names the same for its transaction, so the SAME_SPACE guard
# answers on every slice as it would on the caller's connection (a session of another embedder, of
# weights the space has left, or none).
_HNSW_SETTINGS_AND_EMBEDDER = text(
    _HNSW_SETTINGS_SQL + ", coalesce(current_setting('mlchat.embedder', true), ''),"
    " coalesce(current_setting('mlchat.space_version', true), '')"
)
_SLICE_SETTINGS = text(
    _HNSW_SETTINGS_SQL + ", set_config('mlchat.embedder', :embedder, true),"
    " set_config('mlchat.space_version', :space_version, true)"
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
    connections: int = 1,
) -> list[TurnContext]:
    """Retrieve every turn's context with a single statement; one TurnContext per query, in order.
    With `connections` > 1 the batch is cut into that many slices (round robin) that run the same
    statement at once, one on the session and the others on connections of their own."""
    contexts = [TurnContext() for _ in queries]
    if not queries:
        return contexts
    send_vectors_binary(session)
    slices = min(connections, len(queries))
    if slices <= 1:
        session.execute(_HNSW_SETTINGS, {"ef_search": str(ef_search)})
        rows = _run(session, queries, range(len(queries)), recent_n, history_k, story_k)
    else:
        rows = _run_sliced(session, queries, slices, connections, recent_n, history_k, story_k, ef_search)
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


def _run(
    session: Session,
    queries: Sequence[ContextQuery],
    indices: Sequence[int],
    recent_n: int,
    history_k: int,
    story_k: int,
) -> Sequence[Any]:
    """The statement for the queries at `indices` (rows carry those indices); settings already made."""
    params = dict(
        idx=list(indices),
        conv=[queries[i].conversation_id for i in indices],
        vec=VectorArray(queries[i].vector for i in indices),
        story=[queries[i].story for i in indices],
        story_time=[queries[i].story_time for i in indices],
        recent_n=recent_n,
        history_k=history_k,
        history_scan=settings.rag_history_scan_lines,
        story_k=story_k,
    )
    return session.execute(_BATCH_CONTEXT_SQL, params).all()  # one fetch, not a fetchone per row


# PostgreSQL runs a statement on one core, and the story-event search is ~0.5 ms of index scan per
# query: slices on K connections divide that by up to K on a server with the cores. Slices are
# taken round robin (query i in slice i % K): every query row costs about the same (one recent
# window, one conversation's exact search, one HNSW scan), so the slices are even whatever the
# batch's mix of conversations and stories. Slice 0 runs on the caller's session, in its
# transaction; the others read on their own connections, in transactions of their own, which they
# roll back: retrieval only reads, and a line committed between two slices' snapshots is one the
# caller's own statement could as well have missed or seen. Rows written in the caller's
# transaction and not yet committed are seen by slice 0's queries only, so a caller that writes
# first and then retrieves uses one connection.
def _run_sliced(
    session: Session,
    queries: Sequence[ContextQuery],
    slices: int,
    connections: int,
    recent_n: int,
    history_k: int,
    story_k: int,
    ef_search: int,
) -> list[Any]:
    *_, embedder, space_version = session.execute(
        _HNSW_SETTINGS_AND_EMBEDDER, {"ef_search": str(ef_search)}
    ).one()
    # One pool per configured count, whatever this batch's size: a pool per slice count would keep
    # one more set of idle connections for every batch shorter than `connections`.
    engine = _slice_engine(session.get_bind().engine.url, connections - 1)
    parts = [range(s, len(queries), slices) for s in range(slices)]

    def run_slice(indices: range) -> Sequence[Any]:
        with Session(engine) as own:  # closing rolls its read-only transaction back
            send_vectors_binary(own)
            own.execute(
                _SLICE_SETTINGS,
                {"ef_search": str(ef_search), "embedder": embedder, "space_version": space_version},
            )
            return _run(own, queries, indices, recent_n, history_k, story_k)

    # Threads of this call only (psycopg waits for the server without the GIL): they end with the
    # call, and one batch's slices never queue behind another's, as they could in a shared executor
    # serving the worker's concurrent flushes; starting a thread costs ~0.1 ms against the
    # statement's tens. Leaving the block waits for every slice, so one that raises (here or in a
    # thread) raises from this call once the others are done: no partial context.
    with ThreadPoolExecutor(max_workers=slices - 1, thread_name_prefix="retrieval-slice") as pool:
        futures = [pool.submit(run_slice, part) for part in parts[1:]]
        rows = list(_run(session, queries, parts[0], recent_n, history_k, story_k))
        for future in futures:
            rows.extend(future.result())
    return rows


@cache
def _slice_engine(url: URL, size: int) -> Engine:
    """The slices' connections, in a pool of their own (per database and slice count): the sessions
    of the process's other work never wait for a retrieval's extra connections, nor they for them.
    `size` connections serve one sliced retrieval at a time, twice that two at once; a third waits
    for one to finish (milliseconds)."""
    return keep_server_alive(
        create_engine(
            url,
            pool_size=size,
            max_overflow=size,
            pool_pre_ping=True,
            connect_args=CONNECT_ARGS,
            hide_parameters=True,
        )
    )


# A forked child drops the parent's slice pools (their connections are the parent's) and makes its own.
os.register_at_fork(after_in_child=_slice_engine.cache_clear)
