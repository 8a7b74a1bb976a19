"""A batch's retrieval cut into slices on several connections returns what one statement returns."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from core.settings import settings
from db.history import append_lines
from db.models import Message, Role
from db.retrieval import ContextQuery, TurnContext, _slice_engine, fetch_batch_context
from db.session import get_engine, session_scope
from db.world import find_characters, upsert_conversations, upsert_story_events

pytestmark = pytest.mark.usefixtures("world")

RNG = np.random.default_rng(28)


def _unit(n: int) -> np.ndarray:
    v = RNG.standard_normal((n, settings.embedding_dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _world(stories: int = 3, conversations: int = 5) -> tuple[list[str], list[int]]:
    """Stories of 40 events (times 0-39) and conversations of 30 lines each, committed."""
    tag = uuid.uuid4().hex[:8]
    story_names = [f"slices-{tag}-{s}" for s in range(stories)]
    with session_scope() as s:
        events = [
            {"story": story, "ordinal": i, "time": i, "scene": f"scene {i % 4}", "text": f"{story} event {i}"}
            for story in story_names
            for i in range(40)
        ]
        upsert_story_events(session=s, events=events, embeddings=_unit(len(events)))
        c_id = find_characters(session=s, slugs=["elara"])["elara"]
        rows = [
            {
                "external_id": f"slices-{tag}-{c}",
                "player_id": "p",
                "player_name": "P",
                "character_id": c_id,
            }
            for c in range(conversations)
        ]
        ids = [conv for conv, _ in upsert_conversations(session=s, rows=rows).values()]
        for conv in ids:
            lines = [(Role.USER if i % 2 == 0 else Role.ASSISTANT, f"line {i} of {conv}") for i in range(30)]
            append_lines(session=s, conversation_id=conv, lines=lines, vectors=_unit(len(lines)))
    return story_names, ids


def _batch(stories: list[str], conversations: list[int], n: int = 13) -> list[ContextQuery]:
    """Queries over every conversation and story, with and without a story time, and one without a story."""
    vectors = _unit(n)
    return [
        ContextQuery(
            conversations[i % len(conversations)],
            None if i == 4 else stories[i % len(stories)],
            None if i % 5 == 2 else 10 + 2 * i,
            vectors[i],
        )
        for i in range(n)
    ]


def _fetch(queries: list[ContextQuery], connections: int) -> list[TurnContext]:
    with session_scope() as s:
        return fetch_batch_context(
            session=s,
            queries=queries,
            recent_n=6,
            history_k=3,
            story_k=5,
            ef_search=32,
            connections=connections,
        )


def test_slices_on_several_connections_return_exactly_what_one_statement_returns() -> None:
    stories, conversations = _world()
    queries = _batch(stories, conversations)
    one = _fetch(queries, 1)
    assert all(len(c.recent) == 6 and len(c.similar) == 3 for c in one)
    assert [bool(c.events) for c in one] == [q.story is not None for q in queries]
    timed = [(q.story_time, c.events) for q, c in zip(queries, one, strict=True) if q.story_time is not None]
    assert all(e.time <= time for time, events in timed for e in events)
    url = get_engine().url
    for connections in (2, 3, 5, 64):  # 64 > the batch: one query per slice
        # Equal dataclasses: the same lines and events, with the same scores, in the same order.
        assert _fetch(queries, connections) == one, connections
        # The slices did run on connections of their own: the pool of this count lent and took back.
        pool = _slice_engine(url, connections - 1).pool
        assert pool.checkedin() > 0 and pool.checkedout() == 0, connections  # type: ignore[attr-defined]
    # A shorter batch (4 slices of 64 configured) takes the same pool: no pool per batch length.
    pools = _slice_engine.cache_info().currsize
    assert _fetch(queries[:4], 64) == one[:4]
    assert _slice_engine.cache_info().currsize == pools
    assert not [t for t in threading.enumerate() if t.name.startswith("retrieval-slice")]


@pytest.mark.parametrize("bad", [0, 1], ids=["caller's slice", "another connection's slice"])
def test_an_error_in_any_slice_raises(bad: int) -> None:
    stories, conversations = _world(stories=1, conversations=2)
    queries = _batch(stories, conversations, n=4)
    # A vector of another dimension: the statement fails for that query's slice only.
    queries[bad] = ContextQuery(queries[bad].conversation_id, None, None, np.ones(3, dtype=np.float32))
    with pytest.raises(DBAPIError, match="different vector dimensions"):
        _fetch(queries, 2)
    assert not [t for t in threading.enumerate() if t.name.startswith("retrieval-slice")]
    assert _slice_engine(get_engine().url, 1).pool.checkedout() == 0  # type: ignore[attr-defined]
    assert len(_fetch(queries[2:], 2)) == 2  # the connections are fine for the next batch


def test_a_story_event_without_a_vector_is_never_a_hit_and_never_breaks_the_batch() -> None:
    """Found in review: the event branch did not leave out NULL vectors (a process of a stale
    embedder stores NULL), which sort last as filler when a story has fewer than k embedded events;
    their NULL distance then raised a TypeError that failed the whole batch."""
    from sqlalchemy import update

    from db.models import StoryEvent

    story = f"null-vector-{uuid.uuid4().hex[:8]}"
    events = [{"story": story, "ordinal": i, "time": i, "scene": "", "text": f"event {i}"} for i in range(3)]
    with session_scope() as s:
        upsert_story_events(session=s, events=events, embeddings=_unit(3))
        s.execute(
            update(StoryEvent).where(StoryEvent.story == story, StoryEvent.ordinal > 0).values(embedding=None)
        )
    _, conversations = _world(stories=0, conversations=1)
    [ctx] = _fetch([ContextQuery(conversations[0], story, None, _unit(1)[0])], connections=1)
    assert [hit.text for hit in ctx.events] == ["event 0"]


def test_similar_lines_are_searched_among_the_conversations_last_lines_only(monkeypatch) -> None:
    # Found in review: the exact search read every past line of the conversation on every turn (a
    # conversation of 100k lines: ~150 MB of vectors a turn); older lines are memory's to recall.
    _, (conv,) = _world(stories=1, conversations=1)  # 30 lines, seq 1-30
    with session_scope() as s:
        oldest = s.scalars(
            select(Message.embedding).where(Message.conversation_id == conv, Message.seq == 1)
        ).one()
    query = ContextQuery(conv, None, None, np.asarray(oldest, dtype=np.float32))

    def similar() -> list[int]:
        (ctx,) = fetch_batch_context(  # 6 recent lines: seq 25-30 are not "retrieved"
            session=s, queries=[query], recent_n=6, history_k=30, story_k=0
        )
        return sorted(line.seq for line in ctx.similar)

    with session_scope() as s:
        assert similar() == list(range(1, 25))  # every line before the window, the query's own first
        monkeypatch.setattr(settings, "rag_history_scan_lines", 10)
        assert similar() == list(range(15, 25))  # exactly the 10 lines before the window
