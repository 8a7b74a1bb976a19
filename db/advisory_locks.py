"""PostgreSQL advisory locks held for a block on a connection of their own: a run's submission, the
re-embed, a conversation's story switch.

They are session locks, so they outlive the block's transactions, and a holder that dies (SIGKILL
included) drops its connection and the lock with it: "no lock held" is then exactly "nobody at work",
readable by anyone (`held_by`). Each user has a namespace of its own (the two-key form), so their
keys never meet.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg.errors import LockNotAvailable
from sqlalchemy import ColumnElement, Connection, column, func, literal_column, select, table
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.session import get_lock_engine

_PG_LOCKS = table(
    "pg_locks",
    column("locktype"),
    column("classid"),
    column("objid"),
    column("objsubid"),
    column("granted"),
    column("pid"),
    column("database"),
)
# pg_locks shows every database of the server: a lock of the same name in another (staging beside
# production, say) is not this database's.
_THIS_DATABASE: ColumnElement[Any] = literal_column(
    "(SELECT oid FROM pg_database WHERE datname = current_database())"
)


def name_key(name: str) -> int:
    """A name's 32-bit lock key (signed, as PostgreSQL's int4), the same in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)


# A key: an int, or an int4 expression the server computes (hashtext(...), as older processes did).
Key = int | ColumnElement[int]


@contextmanager
def advisory_lock(namespace: int, key: Key, *, wait_s: float = 0.0) -> Iterator[int | None]:
    """Hold the lock (namespace, key) for the block; yields the backend pid that holds it, or None
    (holding nothing) when another process held it for `wait_s` more seconds. A wait queues on the
    lock (first come, first served), no polling."""
    conn = get_lock_engine().connect()
    may_hold = True  # until known otherwise: a connection that may hold the lock is never pooled again
    try:
        try:
            pid = _take(conn, namespace, key, wait_s)
        except BaseException:  # interrupted, or the server broke off: the lock may be granted already
            conn.invalidate()
            raise
        if pid is None:
            may_hold = False
            yield None
            return
        try:
            yield pid
        finally:
            _release(conn, namespace, key)  # invalidates the connection itself unless released
            may_hold = False
    finally:
        if may_hold:  # interrupted between the take and the block (a signal): pooled, it kept the lock
            conn.invalidate()
        conn.close()


def held_by(*, session: Session, namespace: int, key: int, pid: int | None = None) -> bool:
    """Whether some process (backend `pid`, when given) holds the lock (namespace, key) right now."""
    unsigned = key & 0xFFFFFFFF  # pg_locks shows the two int4 keys as oids
    query = (
        select(func.count())
        .select_from(_PG_LOCKS)
        .where(
            _PG_LOCKS.c.locktype == "advisory",
            _PG_LOCKS.c.classid == namespace,
            _PG_LOCKS.c.objid == unsigned,
            _PG_LOCKS.c.objsubid == 2,  # the two-key form
            _PG_LOCKS.c.granted,
            _PG_LOCKS.c.database == _THIS_DATABASE,
        )
    )
    if pid is not None:
        query = query.where(_PG_LOCKS.c.pid == pid)
    return bool(session.scalar(query))


def _take(conn: Connection, namespace: int, key: Key, wait_s: float) -> int | None:
    """The backend pid, read in the statement that takes the lock; None if it was not taken."""
    if wait_s <= 0:
        with conn.begin():
            taken, pid = conn.execute(
                select(func.pg_try_advisory_lock(namespace, key), func.pg_backend_pid())
            ).one()
        return int(pid) if taken else None
    try:
        with conn.begin():  # the wait's limit is this transaction's; the lock is the session's
            wait_ms = max(1, math.ceil(wait_s * 1000))  # 0 would be no limit at all
            conn.execute(select(func.set_config("lock_timeout", f"{wait_ms}ms", True)))
            _, pid = conn.execute(select(func.pg_advisory_lock(namespace, key), func.pg_backend_pid())).one()
    except OperationalError as exc:
        if isinstance(exc.orig, LockNotAvailable):
            return None
        raise
    return int(pid)


def _release(conn: Connection, namespace: int, key: Key) -> None:
    """Unlock; a connection that may still hold the lock is never pooled again."""
    try:
        with conn.begin():
            released = bool(conn.scalar(select(func.pg_advisory_unlock(namespace, key))))
    except Exception:  # the connection broke; the server released the lock with it
        released = False
    except BaseException:  # interrupted: it may still hold the lock
        conn.invalidate()
        raise
    if not released:
        conn.invalidate()
