"""One engine per process and a short unit-of-work scope."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from pgvector.sqlalchemy import Vector
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from core.services import database_url


@cache
def get_engine() -> Engine:
    """The process's engine; pre-ping so a restarted PostgreSQL costs a reconnect, not an error."""
    return create_engine(database_url(), pool_pre_ping=True, pool_size=5, max_overflow=5)


@cache
def get_autocommit_engine() -> Engine:
    """For units of work that are one statement: autocommit (no BEGIN and COMMIT round trips) and no
    pre-ping (a stale connection fails its statement instead; the caller falls back to session_scope)."""
    return create_engine(database_url(), pool_size=5, max_overflow=5, isolation_level="AUTOCOMMIT")


@cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success, rolls back on error, and always closes."""
    session = _session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def psycopg_connection(session: Session) -> psycopg.Connection[Any]:
    """The psycopg 3 connection under the session's current transaction (for COPY and type adapters)."""
    raw = session.connection().connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        raise TypeError(f"expected a psycopg 3 connection, got {type(raw).__name__}")
    return raw


_vector_ready: weakref.WeakSet[Any] = weakref.WeakSet()


def send_vectors_binary(session: Session) -> None:
    """Teach the session's psycopg connection pgvector's binary format (once per connection): 64
    vectors as text cost milliseconds to format and parse."""
    raw = psycopg_connection(session)
    if raw not in _vector_ready:
        register_vector(raw)
        _vector_ready.add(raw)


class BinaryVector(Vector):
    """A vector parameter handed to psycopg as a float32 array, sent in pgvector's binary format;
    only for statements whose session had send_vectors_binary."""

    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        def process(value: Any) -> Any:
            return None if value is None else np.asarray(value, dtype=np.float32)

        return process
