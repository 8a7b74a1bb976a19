"""Which embedder the stored vectors come from (`vector_space`, one row), so that no process
compares or stores vectors of another model: a process of another embedder is refused when it
loads its embedder (a worker does not start), a connection of another embedder (each names its
own in `mlchat.embedder`, set when it connects: db/session.py) gets no similarity hit and has its
vectors stored as NULL (the trigger of migration 0020), and `mlchat reembed` moves the row to its
embedder in the transaction that swaps the vectors.

An embedder is its name and its weights' fingerprint: its vector of a fixed probe text
(worker/embedder.py). The name is checked by every connection (the trigger, SAME_SPACE_SQL); the
fingerprint by each process once it has loaded its embedder (the first to embed records both),
which is where a model of the same name and other weights comes in (a connection cannot know its
process's weights cheaply)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sqlalchemy import or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import Fact, Message, StoryEvent, VectorSpace

# Two loads of one model give probe vectors whose cosine is 1 up to float noise (another device,
# batch size or BLAS: ~1e-6); another model's fall clearly below. A lightly fine-tuned copy may
# not: one block's weights scaled by 1% still gives 0.9999, and is taken as the same model.
SAME_WEIGHTS_MIN_COSINE = 0.999

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


def same_weights(mine: ArrayLike, recorded: ArrayLike) -> bool:
    """Whether two probe vectors come from the same weights (same dimension, cosine near 1)."""
    a, b = np.asarray(mine, dtype=np.float64), np.asarray(recorded, dtype=np.float64)
    if a.shape != b.shape:
        return False
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return norm > 0 and float(a @ b) / norm >= SAME_WEIGHTS_MIN_COSINE


def _other_weights(mine: ArrayLike | None, recorded: ArrayLike | None) -> bool:
    return mine is not None and recorded is not None and not same_weights(mine, recorded)


def check(*, session: Session, embedder: str, fingerprint: ArrayLike | None = None) -> None:
    """EmbedderMismatch when another embedder than `embedder` is recorded, or the same name with
    other weights than `fingerprint` (when given and one is recorded); records nothing."""
    row = session.execute(select(VectorSpace.embedder, VectorSpace.fingerprint)).first()
    if row is None:
        return
    if row.embedder != embedder:
        raise EmbedderMismatch(
            f"MLCHAT_EMBEDDER={embedder!r} but the stored vectors come from {row.embedder!r}: set "
            f"MLCHAT_EMBEDDER={row.embedder!r}, or move the database to {embedder!r} with `mlchat reembed` "
            "run with it"
        )
    if _other_weights(fingerprint, row.fingerprint):
        raise EmbedderMismatch(
            f"MLCHAT_EMBEDDER={embedder!r} names the stored vectors' embedder but its weights differ (its "
            "vector of the probe text is not theirs): run the model the vectors come from, or move the "
            "database to these weights with `mlchat reembed` run with them"
        )


def fill_or_check(*, session: Session, embedder: str, fingerprint: ArrayLike) -> bool:
    """Record `fingerprint` for a recorded `embedder` that has none yet (whether this call did:
    of processes racing, the first to write wins and the others are checked against it);
    EmbedderMismatch when another name or other weights are recorded."""
    filled = session.execute(
        update(VectorSpace)
        .where(VectorSpace.embedder == embedder, VectorSpace.fingerprint.is_(None))
        .values(fingerprint=np.asarray(fingerprint, dtype=np.float32))
    )
    check(session=session, embedder=embedder, fingerprint=fingerprint)
    return bool(filled.rowcount)  # type: ignore[attr-defined]


NOTHING_RECORDED = (
    "no embedder is recorded for the stored vectors yet, so this process cannot know they are its "
    "embedder's: start a worker of the embedder they come from (it records its embedder), or move them "
    "to this one with `mlchat reembed`; nothing stored"
)


def any_vector_stored(*, session: Session) -> bool:
    """Whether any message, story event or fact has a vector."""
    stored = [
        select(model.id).where(model.embedding.is_not(None)).exists() for model in (Message, StoryEvent, Fact)
    ]
    return bool(session.scalar(select(or_(*stored))))


def record_or_check(
    *, session: Session, embedder: str, fingerprint: ArrayLike, claim_stored: bool = True
) -> None:
    """Record `embedder` and its `fingerprint` when none is recorded yet (or only the fingerprint,
    when the name is recorded without one); EmbedderMismatch when another name or other weights are.
    Without `claim_stored`, a database with vectors and no record is refused (NOTHING_RECORDED)
    rather than claimed: only a worker's start takes stored vectors of unknown origin as its own."""
    vector = np.asarray(fingerprint, dtype=np.float32)
    if not claim_stored and recorded_embedder(session=session) is None and any_vector_stored(session=session):
        raise EmbedderMismatch(NOTHING_RECORDED)
    session.execute(
        insert(VectorSpace).values(embedder=embedder, fingerprint=vector).on_conflict_do_nothing()
    )
    fill_or_check(session=session, embedder=embedder, fingerprint=fingerprint)


def moved_away(*, session: Session, embedder: str, fingerprint: ArrayLike | None = None) -> str | None:
    """The embedder the stored vectors moved to when it is not `embedder`, or not the weights of
    `fingerprint` (when given), with when (a running worker's tick); None while they are still
    this embedder's (or none is recorded)."""
    row = session.execute(
        select(VectorSpace.embedder, VectorSpace.fingerprint, VectorSpace.changed_at)
    ).first()
    if row is None:
        return None
    when = f"{row.changed_at:%Y-%m-%d %H:%M:%S %Z}"
    if row.embedder != embedder:
        return f"the stored vectors moved to {row.embedder!r} at {when}"
    if _other_weights(fingerprint, row.fingerprint):
        return f"the stored vectors moved to other weights of {embedder!r} at {when}"
    return None


def move_to(*, session: Session, embedder: str, fingerprint: ArrayLike) -> None:
    """Record `embedder` and its weights' `fingerprint` as the stored vectors' (the re-embed's swap,
    in its transaction, which holds the writers' lock and writes the new vectors by construction:
    it is not guarded)."""
    vector = np.asarray(fingerprint, dtype=np.float32)
    session.execute(text("SELECT set_config('mlchat.embedder', '', true)"))
    session.execute(
        insert(VectorSpace)
        .values(embedder=embedder, fingerprint=vector)
        .on_conflict_do_update(
            index_elements=[VectorSpace.id],
            set_={"embedder": embedder, "fingerprint": vector, "changed_at": text("now()")},
        )
    )
