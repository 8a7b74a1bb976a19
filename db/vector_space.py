"""Which embedder the stored vectors come from (`vector_space`, one row), so that no process
compares or stores vectors of another model: a process of another embedder is refused when it
loads its embedder (a worker does not start), a connection of another embedder (each names its
own in `mlchat.embedder`, set when it connects: db/session.py) gets no similarity hit and has its
vectors stored as NULL (the trigger of migration 0020), and `mlchat reembed` moves the row to its
embedder in the transaction that swaps the vectors."""

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
_SAME_SPACE = text(f"SELECT {SAME_SPACE_SQL}")  # noqa: S608 - a constant, no input


class EmbedderMismatch(RuntimeError):
    """This process's embedder is not the one the stored vectors come from."""


def recorded_embedder(*, session: Session) -> str | None:
    """The embedder the stored vectors come from; None before anything recorded one."""
    return session.scalar(select(VectorSpace.embedder))


def same_space(*, session: Session) -> bool:
    """Whether this connection's embedder is the stored vectors' (True when either is unknown)."""
    return bool(session.scalar(_SAME_SPACE))


def check(*, session: Session, embedder: str) -> None:
    """EmbedderMismatch when another embedder than `embedder` is recorded (records nothing)."""
    recorded = recorded_embedder(session=session)
    if recorded is not None and recorded != embedder:
        raise EmbedderMismatch(
            f"MLCHAT_EMBEDDER={embedder!r} but the stored vectors come from {recorded!r}: set "
            f"MLCHAT_EMBEDDER={recorded!r}, or move the database to {embedder!r} with `mlchat reembed` "
            "run with it"
        )


def record_or_check(*, session: Session, embedder: str) -> None:
    """Record `embedder` when none is recorded yet; EmbedderMismatch when another one is."""
    session.execute(insert(VectorSpace).values(embedder=embedder).on_conflict_do_nothing())
    check(session=session, embedder=embedder)


def moved_away(*, session: Session, embedder: str) -> str | None:
    """The embedder the stored vectors moved to when it is not `embedder` (a running worker's
    tick), with when; None while they are still `embedder`'s (or none is recorded)."""
    row = session.execute(select(VectorSpace.embedder, VectorSpace.changed_at)).first()
    if row is None or row.embedder == embedder:
        return None
    return f"the stored vectors moved to {row.embedder!r} at {row.changed_at:%Y-%m-%d %H:%M:%S %Z}"


def move_to(*, session: Session, embedder: str) -> None:
    """Record `embedder` as the stored vectors' (the re-embed's swap, in its transaction, which
    holds the writers' lock and writes the new vectors by construction: it is not guarded)."""
    session.execute(text("SELECT set_config('mlchat.embedder', '', true)"))
    session.execute(
        insert(VectorSpace)
        .values(embedder=embedder)
        .on_conflict_do_update(
            index_elements=[VectorSpace.id], set_={"embedder": embedder, "changed_at": text("now()")}
        )
    )
