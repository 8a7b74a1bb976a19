"""Re-embedding every stored vector with a new embedder, resumably, without ever leaving retrieval
to compare vectors of two models: new vectors go to `embedding_next`, chunk by chunk with the
progress recorded, and all of them replace `embedding` in one transaction at the end. A missing
pass fills only the vectors that are NULL, in place, with the stored vectors' own embedder.

One re-embed at a time (a full run or a missing pass): each holds a PostgreSQL advisory lock on a
connection of its own for as long as it runs. A process that dies (SIGKILL included) drops its
connection and with it the lock, so the next run starts (and resumes) without anyone clearing it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sqlalchemy import bindparam, delete, func, select, text, update
from sqlalchemy.orm import Session

from db.advisory_locks import advisory_lock, held_by
from db.facts import EMBEDDED_TEXT
from db.models import Fact, Message, ReembedProgress, StoryEvent
from db.vector_space import move_to, same_weights

_LOCK_NAMESPACE = 0x6D6C7265  # "mlre"
_LOCK_KEY = 0

# Each table with vectors, and the text its vector embeds, as written.
SOURCES: dict[str, tuple[Any, Any]] = {
    "messages": (Message, Message.content),
    "story_events": (StoryEvent, StoryEvent.text),
    "facts": (Fact, EMBEDDED_TEXT),
}


def progress(*, session: Session, table: str, embedder: str, fingerprint: ArrayLike) -> int:
    """The last id re-embedded in `table` by this embedder, its name and its weights' `fingerprint`
    (0: start over; the progress of another name or other weights, or of none recorded, is
    discarded: its next vectors are all written again)."""
    vector = np.asarray(fingerprint, dtype=np.float32)
    row = session.get(ReembedProgress, table)
    if row is None:
        row = ReembedProgress(table_name=table, embedder=embedder, fingerprint=vector.tolist(), last_id=0)
        session.add(row)
    elif row.embedder != embedder or row.fingerprint is None or not same_weights(vector, row.fingerprint):
        row.embedder, row.fingerprint, row.last_id = embedder, vector.tolist(), 0
    session.flush()
    return row.last_id


def next_chunk(*, session: Session, table: str, after_id: int, limit: int) -> list[tuple[int, str]]:
    """(id, text) of the next rows to re-embed, in id order."""
    model, source = SOURCES[table]
    rows = session.execute(
        select(model.id, source).where(model.id > after_id).order_by(model.id).limit(limit)
    )
    return [(int(i), str(t)) for i, t in rows]


def stale_rows(*, session: Session, table: str, limit: int) -> list[tuple[int, str]]:
    """Rows written since their table was passed (no next vector yet)."""
    model, source = SOURCES[table]
    rows = session.execute(
        select(model.id, source).where(model.embedding_next.is_(None)).order_by(model.id).limit(limit)
    )
    return [(int(i), str(t)) for i, t in rows]


def stale_count(*, session: Session, table: str) -> int:
    """How many of the table's rows have no next vector yet."""
    model, _ = SOURCES[table]
    return int(
        session.scalar(select(func.count()).select_from(model).where(model.embedding_next.is_(None))) or 0
    )


def write_next(
    *,
    session: Session,
    table: str,
    rows: Sequence[tuple[int, str]],
    vectors: np.ndarray,
    last_id: int | None,
) -> int:
    """Store the next vectors of `rows` (id, the text embedded) whose text is still that text, and
    the table's progress when `last_id` is given; how many were stored. A row edited since it was
    read (a desk edit, a story event updated) keeps no next vector, so the catch-up embeds its new
    text."""
    model, source = SOURCES[table]
    if rows:
        # Core execution, by id (story_events' key is (id, story); its id is unique through the
        # sequence): not the ORM's bulk UPDATE by primary key.
        still_that_text = (
            update(model)
            .where(model.id == bindparam("row_id"), source.is_not_distinct_from(bindparam("embedded")))
            .values(embedding_next=bindparam("vector"))
        )
        written = session.connection().execute(
            still_that_text,
            [
                {"row_id": i, "embedded": t, "vector": np.asarray(v, dtype=np.float32)}
                for (i, t), v in zip(rows, vectors, strict=True)
            ],
        )
    if last_id is not None:
        row = session.get(ReembedProgress, table)
        assert row is not None
        row.last_id = last_id
    return int(written.rowcount) if rows else 0


def missing_rows(*, session: Session, table: str, after_id: int, limit: int) -> list[tuple[int, str]]:
    """(id, text) of the next rows after `after_id` that have no vector, in id order."""
    model, source = SOURCES[table]
    rows = session.execute(
        select(model.id, source)
        .where(model.id > after_id, model.embedding.is_(None))
        .order_by(model.id)
        .limit(limit)
    )
    return [(int(i), str(t)) for i, t in rows]


def fill_missing(*, session: Session, table: str, ids: Sequence[int], vectors: np.ndarray) -> int:
    """Store the rows' vectors where they still have none; how many this call stored."""
    if not ids:
        return 0
    model, _ = SOURCES[table]
    rows = model.__table__
    # The rows still without a vector, locked until the commit: another writer cannot fill one in
    # between, so the count below is this call's. The lock is the one the UPDATE takes anyway.
    still_null = set(
        session.scalars(
            select(rows.c.id)
            .where(rows.c.id.in_(list(ids)), rows.c.embedding.is_(None))
            .order_by(rows.c.id)  # one lock order for every locker of these rows
            .with_for_update(key_share=True)  # FOR NO KEY UPDATE: foreign-key checks go on
        )
    )
    if not still_null:
        return 0
    by_id = update(rows).where(rows.c.id == bindparam("row_id"))
    session.execute(
        by_id.values(embedding=bindparam("vector")),
        [
            {"row_id": i, "vector": np.asarray(v, dtype=np.float32)}
            for i, v in zip(ids, vectors, strict=True)
            if i in still_null
        ],
    )
    # Counted, not the UPDATE's rowcount: the vector guard (migration 0020) may have stored NULL.
    filled = select(func.count()).where(rows.c.id.in_(list(still_null)), rows.c.embedding.is_not(None))
    return int(session.scalar(filled) or 0)


@contextmanager
def reembed_lock() -> Iterator[int | None]:
    """Hold the re-embed lock on a connection of its own for the block; yields the backend pid that
    holds it (for `lock_still_held`), or None (holding nothing) when another process holds it, i.e. a
    re-embed is running."""
    with advisory_lock(_LOCK_NAMESPACE, _LOCK_KEY) as holder:
        yield holder


def lock_still_held(*, session: Session, pid: int) -> bool:
    """Whether the re-embed lock is still held by backend `pid`: its connection can close under a
    run (a restart, a timeout, a proxy), and the server then lets the next run in."""
    return held_by(session=session, namespace=_LOCK_NAMESPACE, key=_LOCK_KEY, pid=pid)


def lock_tables(*, session: Session) -> None:
    """Hold off writers of every table with vectors until the swap commits (plain reads go on; row
    locks and foreign-key checks on their rows wait, as writes do). EXCLUSIVE,
    not SHARE ROW EXCLUSIVE: that one let a row lock in (gossip's SELECT … FOR UPDATE of a fact), whose
    holder then waited for the table as the swap waited for its row, a deadlock. In the order the
    original request shape's store writes them (story events, then messages)."""
    session.execute(text("LOCK TABLE story_events, messages, facts IN EXCLUSIVE MODE"))


def swap(*, session: Session, embedder: str, fingerprint: ArrayLike) -> dict[str, int]:
    """Every next vector becomes the vector and `embedder` (with its weights' `fingerprint`) the
    stored vectors' one, in this transaction; rows swapped per table."""
    # First: the vector guard lets this embedder's in.
    move_to(session=session, embedder=embedder, fingerprint=fingerprint)
    swapped = {}
    for table, (model, _) in SOURCES.items():
        done = session.execute(
            update(model)
            .where(model.embedding_next.is_not(None))
            .values(embedding=model.embedding_next, embedding_next=None)
            .execution_options(synchronize_session=False)
        )
        swapped[table] = int(done.rowcount)  # type: ignore[attr-defined]
    session.execute(delete(ReembedProgress))
    return swapped
