"""Benchmark: one batch's retrieval against a large synthetic world, in its own database.

Rows: `conversations` conversations of `messages // conversations` lines each, and `events` story
events over 10 stories. Vectors are synthetic but clustered the way sentence embeddings are (unit
vectors around a few hundred topic centres), generated with numpy and streamed with binary COPY:
nothing is embedded. The world is built once and kept under the bench state dir; a later run with
the same sizes reuses it.

Figures: p50/p95 of `fetch_batch_context` for a batch of 64 turns (recent history, similar history,
story events with the story filter), and story-event recall@10 of the HNSW search (pgvector 0.8
iterative scan) against exact search with the index disabled.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
from psycopg import sql
from sqlalchemy import create_engine, func, make_url, select, text
from sqlalchemy.orm import Session

from core.embedded import ensure_database
from core.services import database_url
from core.settings import settings
from db.models import Conversation, Message, StoryEvent
from db.retrieval import ContextQuery, fetch_batch_context
from db.world import upsert_character

DATABASE = "mlchat_bench_retrieval"
STORIES = 10
TOPICS = 300
DIM = settings.embedding_dim
CHUNK = 50_000

EXACT_EVENTS_SQL = text(
    """
    SELECT id FROM story_events
    WHERE story = :story AND time <= :story_time
    ORDER BY embedding <=> CAST(:vec AS vector) LIMIT :k
    """
)


class Vectors:
    """Unit vectors scattered around fixed topic centres (one generator, reproducible)."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        centres = self.rng.standard_normal((TOPICS, DIM)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def sample(self, n: int, spread: float = 0.6) -> np.ndarray:
        picks = self.centres[self.rng.integers(0, TOPICS, n)]
        noise = self.rng.standard_normal((n, DIM)).astype(np.float32) * (spread / np.sqrt(DIM))
        out = picks + noise
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _bench_engine(database: str = DATABASE) -> Any:
    url = make_url(database_url())
    ensure_database(url.set(drivername="postgresql").render_as_string(hide_password=False), database)
    return create_engine(url.set(database=database))


def _migrate(engine: Any) -> None:
    from alembic import command

    from db.migrate import alembic_config

    cfg = alembic_config()
    # A plain connection, not engine.begin(): migration 0018's autocommit block needs Alembic to own
    # the transaction.
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()


def _counts(engine: Any) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(select(func.count()).select_from(model)).scalar_one()
            for model in (Conversation, Message, StoryEvent)
        )


def _build_world(engine: Any, messages: int, conversations: int, events: int) -> float:
    """Fill the bench database; returns seconds taken."""
    from pgvector.psycopg import register_vector

    started = time.perf_counter()
    vectors = Vectors()
    per_conversation = messages // conversations
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE messages, turns, conversations, story_events, characters CASCADE"))
        char_id = upsert_character(session=Session(bind=conn), slug="bench", fields={"name": "Bench"})
        conn.execute(
            text(
                "INSERT INTO conversations"
                " (external_id, character_id, player_id, player_name, story, story_time)"
                " SELECT 'bench-' || g, :c, '', 'P', 'story-' || (g % :s), 1000 FROM generate_series(1, :n) g"
            ),
            {"c": char_id, "s": STORIES, "n": conversations},
        )
        conv_ids = [row[0] for row in conn.execute(text("SELECT id FROM conversations ORDER BY id"))]
        index_defs = (
            conn.execute(
                text(
                    "SELECT indexdef FROM pg_indexes"
                    " WHERE tablename = 'story_events' AND indexdef ILIKE '%hnsw%'"
                )
            )
            .scalars()
            .all()
        )
        raw = conn.connection.driver_connection
        for definition in index_defs:  # build HNSW once after loading: far faster than row by row
            name = definition.split(" INDEX ", 1)[1].split(" ON ", 1)[0]
            raw.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
        register_vector(raw)
        cursor = raw.cursor()
        with cursor.copy(
            "COPY messages (conversation_id, seq, role, content, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "int4", "varchar", "text", "vector"])
            for start in range(0, messages, CHUNK):
                block = vectors.sample(min(CHUNK, messages - start))
                for offset, vec in enumerate(block):
                    i = start + offset
                    role = "user" if i % 2 == 0 else "assistant"
                    copy.write_row(
                        (conv_ids[i // per_conversation], i % per_conversation + 1, role, f"line {i}", vec)
                    )
        with cursor.copy(
            "COPY story_events (story, ordinal, scene, time, text, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["varchar", "int4", "varchar", "int4", "text", "vector"])
            block = vectors.sample(events)
            for i, vec in enumerate(block):
                copy.write_row(
                    (f"story-{i % STORIES}", i // STORIES, "scene", (i // STORIES) % 1000, f"event {i}", vec)
                )
        conn.execute(text("SET maintenance_work_mem = '1GB'"))
        for definition in index_defs:
            # A partitioned table's index reads "ON ONLY" in pg_indexes: made so, it would index none of
            # the partitions (every story search an exact scan). Without ONLY it builds each one's graph.
            conn.execute(text(definition.replace(" ON ONLY ", " ON ", 1)))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE messages, story_events, conversations"))
    return time.perf_counter() - started


def measure_retrieval(
    messages: int = 1_000_000,
    conversations: int = 10_000,
    events: int = 100_000,
    batch: int = 64,
    rounds: int = 30,
    k: int = 10,
) -> dict[str, Any]:
    """Build (or reuse) the world, then time batched retrieval and check recall. A world of another
    size lives in a database of its own, so the 1M world is kept beside it."""
    engine = _bench_engine(DATABASE if messages == 1_000_000 else f"{DATABASE}_{messages}")
    _migrate(engine)
    build_s = None
    if _counts(engine) != (conversations, messages, events):
        build_s = _build_world(engine, messages, conversations, events)
    queries_rng = np.random.default_rng(11)
    vectors = Vectors()
    vectors.rng = np.random.default_rng(13)  # same topic centres, fresh samples for queries
    with engine.connect() as conn:
        conv_rows = conn.execute(text("SELECT id, story FROM conversations")).all()

    latencies, recalls = [], []
    with Session(engine) as session:
        for round_ in range(rounds + 1):
            picks = queries_rng.integers(0, len(conv_rows), batch)
            story_times = queries_rng.integers(100, 1000, batch)
            qvecs = vectors.sample(batch)
            queries = [
                ContextQuery(conv_rows[p].id, conv_rows[p].story, int(t), v)
                for p, t, v in zip(picks, story_times, qvecs, strict=True)
            ]
            started = time.perf_counter()
            contexts = fetch_batch_context(
                session=session,
                queries=queries,
                recent_n=12,
                history_k=4,
                story_k=k,
                ef_search=settings.hnsw_ef_search,
                connections=settings.retrieval_connections,
            )
            elapsed_ms = (time.perf_counter() - started) * 1000
            session.commit()
            if round_ == 0:
                continue  # first round warms the caches and the plan
            latencies.append(elapsed_ms)
            session.execute(text("SET LOCAL enable_indexscan = off"))
            session.execute(text("SET LOCAL enable_bitmapscan = off"))
            for query, ctx in zip(queries, contexts, strict=True):
                exact = set(
                    session.execute(
                        EXACT_EVENTS_SQL,
                        {
                            "story": query.story,
                            "story_time": query.story_time,
                            "vec": "[" + ",".join(map(str, query.vector.tolist())) + "]",
                            "k": k,
                        },
                    ).scalars()
                )
                recalls.append(len(exact & {hit.id for hit in ctx.events}) / max(1, len(exact)))
            session.commit()
    latencies.sort()
    return {
        "messages": messages,
        "conversations": conversations,
        "story_events": events,
        "batch": batch,
        "rounds": rounds,
        "world_build_s": None if build_s is None else round(build_s, 1),
        "p50_ms_per_batch": round(statistics.median(latencies), 2),
        "p95_ms_per_batch": round(p95(latencies), 2),
        "target_p50_ms": 20.0,
        "story_recall_at_10": round(statistics.mean(recalls), 4),
        "target_recall": 0.95,
        "hnsw_ef_search": settings.hnsw_ef_search,
        "retrieval_connections": settings.retrieval_connections,
        "story_event_partitions": _partitions(engine),
    }


def _partitions(engine: Any) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM pg_inherits WHERE inhparent = 'story_events'::regclass")
            ).scalar_one()
        )


def p95(values: list[float]) -> float:
    """The 95th percentile, interpolated between ranks (the index rounded down, as before, read the
    93rd percentile of 30 rounds: review)."""
    return statistics.quantiles(values, n=100, method="inclusive")[94]
