"""Which embedder the stored vectors come from (`vector_space`, one row), so that no process
compares or stores vectors of another model: a worker of another embedder refuses to start, a
connection of another embedder (it names its own in `mlchat.embedder`, db/session.py) gets no
similarity hits and has its vectors stored as NULL (the trigger of migration 0020), and
`mlchat reembed` moves the row to its embedder in the transaction that swaps the vectors."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import VectorSpace

# True when this connection's embedder is the recorded one (or either is unknown): the retrieval
# statements' guard, evaluated once per statement.
SAME_SPACE_SQL = (
    "coalesce((SELECT embedder FROM vector_space)"
    " = nullif(current_setting('mlchat.embedder', true), ''), true)"
)


class EmbedderMismatch(RuntimeError):
    """This process's embedder is not the one the stored vectors come from."""


def recorded_embedder(*, session: Session) -> str | None:
    """The embedder the stored vectors come from; None before anything recorded one."""
    return session.scalar(select(VectorSpace.embedder))


def record_or_check(*, session: Session, embedder: str) -> None:
    """Record `embedder` when none is recorded yet; EmbedderMismatch when another one is."""
    session.execute(insert(VectorSpace).values(embedder=embedder).on_conflict_do_nothing())
    recorded = recorded_embedder(session=session)
    if recorded != embedder:
        raise EmbedderMismatch(
            f"MLCHAT_EMBEDDER={embedder!r} but the stored vectors come from {recorded!r}: run "
            f"`mlchat reembed` with {embedder!r} first (it moves the database to it), or set "
            f"MLCHAT_EMBEDDER={recorded!r}"
        )


def move_to(*, session: Session, embedder: str) -> None:
    """Record `embedder` as the stored vectors' (the re-embed's swap, in its transaction, which then
    writes as that embedder whatever this process's connections name)."""
    session.execute(text("SELECT set_config('mlchat.embedder', :embedder, true)"), {"embedder": embedder})
    session.execute(
        insert(VectorSpace)
        .values(embedder=embedder)
        .on_conflict_do_update(
            index_elements=[VectorSpace.id], set_={"embedder": embedder, "changed_at": text("now()")}
        )
    )
