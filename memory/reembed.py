"""`mlchat reembed`: every message, story event and fact embedded again with the configured
embedder (after MLCHAT_EMBEDDER changes), as a resumable bulk job. Vectors are written beside the
old ones chunk by chunk (each chunk its own transaction, progress recorded), so a run that stops
resumes where it stopped; retrieval keeps using the old vectors until the end, when rows written
meanwhile are caught up (without a lock until few remain, then the rest under a table lock) and
every new vector replaces its old one in one transaction. Retrieval never compares vectors of two models.

`mlchat reembed --missing`: only the vectors that are NULL (stored by a connection of another
embedder, or never written), embedded with the stored vectors' own embedder and written in place,
a chunk per transaction. One re-embed of either kind runs at a time; another is refused at once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from sqlalchemy.orm import Session

from core.settings import settings
from db.introspect import vector_column_dim
from db.reembed import (
    SOURCES,
    fill_missing,
    lock_still_held,
    lock_tables,
    missing_rows,
    next_chunk,
    progress,
    reembed_lock,
    stale_count,
    stale_rows,
    swap,
    write_next,
)
from db.session import session_scope
from db.vector_space import EmbedderMismatch, check, recorded_embedder
from worker.embedder import check_dimension, embed, fingerprint

logger = logging.getLogger(__name__)

CATCH_UP_PASSES = 20


class ReembedBusy(RuntimeError):
    """Another `mlchat reembed` (a full run or a missing pass) is running."""


class ReembedLockLost(RuntimeError):
    """The run's lock connection closed under it (a restart, a timeout): it stopped before writing
    more; run again, it resumes (a failure of the database's, not input refused)."""


class ReembedOutpaced(RuntimeError):
    """Rows were written faster than the catch-up embedded them: nothing swapped, the run resumes."""


@contextmanager
def _alone() -> Iterator[int]:
    """The re-embed lock for the block (its holder's backend pid), or ReembedBusy before anything
    is changed."""
    with reembed_lock() as holder:
        if holder is None:
            raise ReembedBusy(
                "another mlchat reembed is running (a full run or a --missing pass); nothing changed: "
                "run this one again when it has ended"
            )
        yield holder


def _still_alone(session: Session, holder: int) -> None:
    """ReembedLockLost when the lock's connection closed under this run (another may have started):
    checked in every transaction that writes next vectors, in the swap's, and in every transaction
    of a --missing pass that fills vectors."""
    if not lock_still_held(session=session, pid=holder):
        raise ReembedLockLost(
            "this mlchat reembed lost its lock (its connection to PostgreSQL closed) and stopped before "
            "writing more: run it again to resume"
        )


def _waiting() -> int:
    """Rows of every table with no next vector yet."""
    with session_scope() as session:
        return sum(stale_count(session=session, table=table) for table in SOURCES)


def _catch_up(session: Session, table: str, chunk: int, holder: int) -> tuple[int, int]:
    """Embed up to `chunk` of the table's rows that have no next vector yet; how many were read and
    how many stored (fewer when a row's text changed meanwhile: read again by the next pass). The
    lock is checked once the chunk is embedded, as the passes do: a run that lost it while embedding
    (another may have started, with other weights) writes nothing."""
    return _store_next(session, table, stale_rows(session=session, table=table, limit=chunk), holder)


def _store_next(session: Session, table: str, rows: list[tuple[int, str]], holder: int) -> tuple[int, int]:
    """_catch_up's embedding and write of the rows it read."""
    if not rows:
        return 0, 0
    vectors = embed([t for _, t in rows], any_space=True)
    _still_alone(session, holder)
    return len(rows), write_next(session=session, table=table, rows=rows, vectors=vectors, last_id=None)


def reembed(*, chunk: int = 512, on_chunk: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Re-embed everything and swap the vectors in; rows swapped per table. `on_chunk(table, last
    id)` is called after each committed chunk. ReembedBusy while another re-embed runs."""
    with _alone() as holder:
        return _reembed(chunk, on_chunk, holder)


def _reembed(chunk: int, on_chunk: Callable[[str, int], None] | None, holder: int) -> dict[str, int]:
    mine = fingerprint()
    with session_scope() as session:  # before anything is written: the columns' size is fixed
        column_dim = vector_column_dim(session=session, table="messages", column="embedding_next")
    if column_dim is not None:
        check_dimension(len(mine), column_dim)
    for table in SOURCES:
        with session_scope() as session:
            _still_alone(session, holder)
            last = progress(session=session, table=table, embedder=settings.embedder, fingerprint=mine)
        while True:
            with session_scope() as session:
                rows = next_chunk(session=session, table=table, after_id=last, limit=chunk)
                if not rows:
                    break
                vectors = embed([t for _, t in rows], any_space=True)
                last = rows[-1][0]
                _still_alone(session, holder)
                write_next(session=session, table=table, rows=rows, vectors=vectors, last_id=last)
            if on_chunk is not None:
                on_chunk(table, last)
    for _ in range(CATCH_UP_PASSES):
        _catch_up_unlocked(chunk, holder)
        try:
            return _swap_under_the_lock(chunk, holder, mine)
        except _RestTooBig as big:
            logger.info("re-embed: %s; caught up again without the writers' lock", big)
    raise ReembedOutpaced(
        f"rows kept arriving between the catch-up and the writers' lock ({CATCH_UP_PASSES} times, more "
        "than a chunk each time); nothing swapped and the writers never waited long: run it again in a "
        "quieter hour (it resumes, the next vectors stored so far kept)"
    )


class _RestTooBig(Exception):
    """More than a chunk of one table was found without a next vector once the writers' lock was
    held (written between the last unlocked pass and the lock): rolled back, caught up unlocked again."""


def _swap_under_the_lock(chunk: int, holder: int, mine: np.ndarray) -> dict[str, int]:
    """Under the writers' lock: the rest (at most a chunk a table, else _RestTooBig, nothing kept:
    embedding more there would stall every worker's store, a history import's 100,000 lines for
    minutes) embedded, then the swap."""
    with session_scope() as session:
        lock_tables(session=session)
        _still_alone(session, holder)
        # Every table read before any is embedded: an overflow found in the last would otherwise
        # throw away what the first ones embedded while the writers waited (review).
        rests = {table: stale_rows(session=session, table=table, limit=chunk + 1) for table in SOURCES}
        for table, rows in rests.items():
            if len(rows) > chunk:
                raise _RestTooBig(f"more than {chunk} {table} rows arrived before the writers' lock")
        for table, rows in rests.items():  # no writer can change a text now: every row read is stored
            read, stored = _store_next(session, table, rows, holder)
            if stored < read:
                raise RuntimeError(
                    f"re-embed: {read - stored} of {read} {table} rows kept no next vector under the "
                    "writers' lock; nothing swapped (a bug: please report it)"
                )
        swapped = swap(session=session, embedder=settings.embedder, fingerprint=mine)
    logger.info("re-embedded with %s: %s", settings.embedder, swapped)
    return swapped


def _catch_up_unlocked(chunk: int, holder: int) -> None:
    """Rows written while the tables were passed: caught up without the lock, a chunk per
    transaction, until one pass finds less than a chunk; only that last little rest is embedded
    under the lock (writers wait for it and the swap).
    A backlog of any size drains (each pass embeds a chunk of each table, and fewer rows wait after
    it); writes that keep it from shrinking for CATCH_UP_PASSES passes in a row would leave the rest to
    be embedded under the writers' lock, every worker's store waiting on it: the run stops instead."""
    waiting, stalled = _waiting(), 0
    while True:
        caught = 0
        for table in SOURCES:
            with session_scope() as session:
                _still_alone(session, holder)
                caught += _catch_up(session, table, chunk, holder)[0]
        if caught < chunk:
            break
        now_waiting = _waiting()
        stalled = stalled + 1 if now_waiting >= waiting else 0
        waiting = now_waiting
        if stalled >= CATCH_UP_PASSES:
            raise ReembedOutpaced(
                "rows are written faster than the re-embed catches up (no fewer waited after "
                f"{CATCH_UP_PASSES} passes in a row); nothing swapped and the writers never waited: run it "
                "again in a quieter hour (it resumes, the next vectors stored so far kept)"
            )


def reembed_missing(
    *, chunk: int = 512, on_chunk: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Give every row without a vector one from this process's embedder; rows filled per table.
    EmbedderMismatch (nothing written) when the stored vectors are another embedder's or none is
    recorded, ReembedBusy
    while another re-embed runs. `on_chunk(table, last id)` is called after each committed chunk."""
    with _alone() as holder:
        with session_scope() as session:
            if recorded_embedder(session=session) is None:  # the stored vectors' model is not known
                raise EmbedderMismatch(
                    "no embedder is recorded for the stored vectors yet, so a --missing pass cannot know "
                    "which model they come from: start a worker (it records its embedder) or run a full "
                    "`mlchat reembed`; nothing written"
                )
            check(session=session, embedder=settings.embedder)
        filled = dict.fromkeys(SOURCES, 0)
        for table in SOURCES:
            last = 0  # the id cursor ends the pass even where a vector could not be stored
            while True:
                with session_scope() as session:
                    rows = missing_rows(session=session, table=table, after_id=last, limit=chunk)
                    if not rows:
                        break
                    vectors = embed([t for _, t in rows])
                    _still_alone(session, holder)
                    filled[table] += fill_missing(
                        session=session, table=table, ids=[i for i, _ in rows], vectors=vectors
                    )
                    last = rows[-1][0]
                if on_chunk is not None:
                    on_chunk(table, last)
    logger.info("missing vectors filled with %s: %s", settings.embedder, filled)
    return filled
