"""Re-embedding every stored vector with a new embedder, resumably, without ever leaving retrieval
to compare vectors of two models: new vectors go to `embedding_next`, chunk by chunk with the
progress recorded, and all of them replace `embedding` in one transaction at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sqlalchemy import bindparam, delete, select, text, update
from sqlalchemy.orm import Session

from db.models import Fact, Message, ReembedProgress, StoryEvent
from db.vector_space import move_to

# Each table with vectors, and the text its vector embeds (facts: "subject: text", as written).
SOURCES: dict[str, tuple[Any, Any]] = {
    "messages": (Message, Message.content),
    "story_events": (StoryEvent, StoryEvent.text),
    "facts": (Fact, Fact.subject + ": " + Fact.text),
}


def progress(*, session: Session, table: str, embedder: str) -> int:
    """The last id re-embedded in `table` by this embedder (0: start over; another embedder's
    progress is discarded)."""
    row = session.get(ReembedProgress, table)
    if row is None:
        row = ReembedProgress(table_name=table, embedder=embedder, last_id=0)
        session.add(row)
    elif row.embedder != embedder:
        row.embedder, row.last_id = embedder, 0
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


def write_next(
    *, session: Session, table: str, ids: Sequence[int], vectors: np.ndarray, last_id: int | None
) -> None:
    """Store the rows' next vectors, and the table's progress when `last_id` is given."""
    model, _ = SOURCES[table]
    if ids:
        # By id alone (story_events' key is (id, story); its id is unique through the sequence).
        rows = model.__table__
        by_id = update(rows).where(rows.c.id == bindparam("row_id"))
        session.execute(
            by_id.values(embedding_next=bindparam("vector")),
            [
                {"row_id": i, "vector": np.asarray(v, dtype=np.float32)}
                for i, v in zip(ids, vectors, strict=True)
            ],
        )
    if last_id is not None:
        row = session.get(ReembedProgress, table)
        assert row is not None
        row.last_id = last_id


def lock_tables(*, session: Session) -> None:
    """Hold off writers of every table with vectors until the swap commits (reads go on)."""
    session.execute(text("LOCK TABLE messages, story_events, facts IN SHARE ROW EXCLUSIVE MODE"))


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
