"""One engine per process and a short unit-of-work scope."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from core.services import database_url
from core.settings import settings


def _connect_args() -> dict[str, Any]:
    """Every connection names this process's embedder (`mlchat.embedder`): the database stores no
    vector of another embedder and retrieval compares none (db/vector_space.py)."""
    name = settings.embedder.replace("\\", "\\\\").replace(" ", "\\ ")
    return {"options": f"-c mlchat.embedder={name}"}


@cache
def get_engine() -> Engine:
    """The process's engine; pre-ping so a restarted PostgreSQL costs a reconnect, not an error."""
    return create_engine(
        database_url(), pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=_connect_args()
    )


@cache
def get_autocommit_engine() -> Engine:
    """For units of work that are one statement: autocommit (no BEGIN and COMMIT round trips) and no
    pre-ping (a stale connection fails its statement instead; the caller falls back to session_scope)."""
    return create_engine(
        database_url(),
        pool_size=5,
        max_overflow=5,
        isolation_level="AUTOCOMMIT",
        connect_args=_connect_args(),
    )


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
