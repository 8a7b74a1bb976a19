"""Which embedder the stored vectors come from (`vector_space`, one row), so that no process
compares or stores vectors of another model: a process of another embedder is refused when it
loads its embedder (a worker does not start), a connection of another embedder (each names its
own in `mlchat.embedder`, set when it connects: db/session.py) gets no similarity hit and has its
vectors stored as NULL (the trigger of migration 0020), and `mlchat reembed` moves the row to its
embedder in the transaction that swaps the vectors.

An embedder is its name and its weights' fingerprint: its vector of a fixed probe text
(worker/embedder.py). The name is checked by every connection (the trigger, SAME_SPACE_SQL); the
fingerprint by each process once it has loaded its embedder (the first to embed records both) and
again from time to time, which is where a model of the same name and other weights comes in (a
connection cannot know its process's weights cheaply). The record's `version` changes with the
name or the weights; a process that checked its weights names the version it checked them against
on its connections (db/session.py), so a connection of a process whose weights the space has left
stores no vector and finds no similar one either (the trigger of migration 0024, SAME_SPACE_SQL),
from the swap on and not only once the process notices."""

from __future__ import annotations

from typing import Any

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

# True when this connection's embedder is the recorded one, and so is the version its process
# checked its weights against (each part true when either side is unknown): the retrieval
# statements' guard, evaluated once per statement.
SAME_SPACE_SQL = (
    "coalesce((SELECT embedder FROM vector_space)"
    " = nullif(current_setting('mlchat.embedder', true), ''), true)"
    " AND coalesce((SELECT version::text FROM vector_space)"
    " = nullif(current_setting('mlchat.space_version', true), ''), true)"
)
_SAME_SPACE = text(f"SELECT {SAME_SPACE_SQL}")  # noqa: S608 - a constant, no input


# The record's version comes from a sequence: a record deleted and made again gets a number no
# process holds (migration 0024).
NEXT_VERSION = "nextval('vector_space_version_seq')"


class EmbedderMismatch(RuntimeError):
    """This process's embedder is not the one the stored vectors come from."""


class SpaceMoved(EmbedderMismatch):
    """The stored vectors moved to another embedder while a write's were embedded: nothing stored,
    and the write goes through sent again (to a process of the new embedder)."""


def recorded_embedder(*, session: Session) -> str | None:
    """The embedder the stored vectors come from; None before anything recorded one."""
    return session.scalar(select(VectorSpace.embedder))


def recorded_version(*, session: Session) -> int | None:
    """The record's version (None before anything recorded one)."""
    return session.scalar(select(VectorSpace.version))


def same_space(*, session: Session) -> bool:
    """Whether this connection's embedder is the stored vectors' (True when either is unknown)."""
    return bool(session.scalar(_SAME_SPACE))


def refuse_if_moved(*, session: Session, what: str) -> None:
    """SpaceMoved (an EmbedderMismatch), in the transaction that stored `what`'s vectors (its
    rollback stores none), when the stored vectors are no longer this connection's space: a
    re-embed's swap committed while they were embedded, and the guard trigger stored them NULL,
    never to be found by similarity."""
    if not same_space(session=session):
        raise SpaceMoved(
            f"{what}: the stored vectors moved to another embedder while it was embedded (a re-embed "
            "swapped them in); nothing stored: send it again (a process of that embedder stores it)"
        )


def same_weights(mine: ArrayLike, recorded: ArrayLike) -> bool:
    """Whether two probe vectors come from the same weights (same dimension, cosine near 1)."""
    a, b = np.asarray(mine, dtype=np.float64), np.asarray(recorded, dtype=np.float64)
    if a.shape != b.shape:
        return False
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return norm > 0 and float(a @ b) / norm >= SAME_WEIGHTS_MIN_COSINE


def _other_weights(mine: ArrayLike | None, recorded: ArrayLike | None) -> bool:
    return mine is not None and recorded is not None and not same_weights(mine, recorded)


def check(*, session: Session, embedder: str, fingerprint: ArrayLike | None = None) -> int | None:
    """EmbedderMismatch when another embedder than `embedder` is recorded, or the same name with
    other weights than `fingerprint` (when given and one is recorded); records nothing. The
    recorded version when `fingerprint` was checked against the recorded one, else None."""
    row = session.execute(select(VectorSpace.embedder, VectorSpace.fingerprint, VectorSpace.version)).first()
    if row is None:
        return None
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
    return row.version if fingerprint is not None and row.fingerprint is not None else None


def fill_or_check(*, session: Session, embedder: str, fingerprint: ArrayLike) -> bool:
    """Record `fingerprint` for a recorded `embedder` that has none yet (whether this call did:
    of processes racing, the first to write wins and the others are checked against it);
    EmbedderMismatch when another name or other weights are recorded."""
    filled, _ = _fill_and_check(session=session, embedder=embedder, fingerprint=fingerprint)
    return filled


def _fill_and_check(*, session: Session, embedder: str, fingerprint: ArrayLike) -> tuple[bool, int | None]:
    """fill_or_check's work: whether this call filled the fingerprint, and the version checked."""
    filled = session.execute(
        update(VectorSpace)
        .where(VectorSpace.embedder == embedder, VectorSpace.fingerprint.is_(None))
        .values(fingerprint=np.asarray(fingerprint, dtype=np.float32))
    )
    version = check(session=session, embedder=embedder, fingerprint=fingerprint)
    return bool(filled.rowcount), version  # type: ignore[attr-defined]


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
) -> int:
    """Record `embedder` and its `fingerprint` when none is recorded yet (or only the fingerprint,
    when the name is recorded without one); EmbedderMismatch when another name or other weights are.
    The version of the space these weights were checked against (db/session.adopt_space_version).
    Without `claim_stored`, a database with vectors and no record is refused (NOTHING_RECORDED)
    rather than claimed: only a worker's start takes stored vectors of unknown origin as its own."""
    vector = np.asarray(fingerprint, dtype=np.float32)
    if not claim_stored and recorded_embedder(session=session) is None and any_vector_stored(session=session):
        raise EmbedderMismatch(NOTHING_RECORDED)
    session.execute(
        insert(VectorSpace).values(embedder=embedder, fingerprint=vector).on_conflict_do_nothing()
    )
    _, version = _fill_and_check(session=session, embedder=embedder, fingerprint=fingerprint)
    assert version is not None  # recorded above, with a fingerprint
    return version


def moved_away(
    *, session: Session, embedder: str, fingerprint: ArrayLike | None = None
) -> tuple[str | None, int | None]:
    """The embedder the stored vectors moved to when it is not `embedder`, or not the weights of
    `fingerprint` (when given), with when (a running worker's tick), and None; or None and the
    space's version while they are still this embedder's and these weights' (a re-embed to the
    same weights, or away and back, changes the version and not the weights), or None and None
    when none is recorded or no weights were compared."""
    row = session.execute(
        select(VectorSpace.embedder, VectorSpace.fingerprint, VectorSpace.version, VectorSpace.changed_at)
    ).first()
    if row is None:
        return None, None
    when = f"{row.changed_at:%Y-%m-%d %H:%M:%S %Z}"
    if row.embedder != embedder:
        return f"the stored vectors moved to {row.embedder!r} at {when}", None
    if _other_weights(fingerprint, row.fingerprint):
        return f"the stored vectors moved to other weights of {embedder!r} at {when}", None
    compared = fingerprint is not None and row.fingerprint is not None
    return None, row.version if compared else None


def move_to(*, session: Session, embedder: str, fingerprint: ArrayLike) -> None:
    """Record `embedder` and its weights' `fingerprint` as the stored vectors' (the re-embed's swap,
    in its transaction, which holds the writers' lock and writes the new vectors by construction:
    it is not guarded), with a new version when the name or the weights change. The same weights
    keep their recorded fingerprint (the cosine test is not transitive: a fingerprint rewritten by
    each re-embed within it could drift away from the weights the version's processes hold)."""
    vector = np.asarray(fingerprint, dtype=np.float32)
    session.execute(text("SELECT set_config('mlchat.embedder', '', true)"))
    was = session.execute(select(VectorSpace.embedder, VectorSpace.fingerprint).with_for_update()).first()
    if was is None:
        session.execute(insert(VectorSpace).values(embedder=embedder, fingerprint=vector))
        return
    moved: dict[str, Any] = {"changed_at": text("now()")}
    if was.embedder != embedder or _other_weights(vector, was.fingerprint):
        # A new number, never one a process may hold (the sequence outlives a deleted record).
        moved |= {"embedder": embedder, "fingerprint": vector, "version": text(NEXT_VERSION)}
    elif was.fingerprint is None:  # recorded before migration 0022: no process checked a version
        moved |= {"fingerprint": vector}
    session.execute(update(VectorSpace).values(**moved))
