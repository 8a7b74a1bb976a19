"""One engine per process and a short unit-of-work scope."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from core.services import database_url
from core.settings import settings

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# libpq's own defaults wait on a connection cut without a word (a failover, a NAT forgetting it) for
# the kernel's two hours of keepalive silence, or its retransmissions' quarter of an hour: a request
# or a batch thread hung that long instead of failing over. TCP keepalives find a dead peer in about
# a minute, tcp_user_timeout bounds data sent and never acknowledged, and a connect gives up after
# 10 s. (A Unix socket, the embedded server's, ignores the TCP ones.)
CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms
}
_space_version: int | None = None


def adopt_space_version(version: int | None) -> None:
    """The vector space's version this process's embedder weights were checked against
    (db/vector_space.py): its connections name it from their next checkout on, and the database
    stores as NULL any vector they write once the space has moved to another version (migration
    0024), as it does one of another embedder name."""
    global _space_version
    _space_version = version


def adopted_space_version() -> int | None:
    """The version this process's connections name (None before its weights were checked)."""
    return _space_version


# The server's side of the same: a host lost without a word (power, a partition) keeps its
# connections' advisory locks (a submission's, the sweep's re-send lock) and open transactions (a
# finalizing run's row) until the server notices, after the kernel's two hours of keepalive silence
# with a stock server; every sweep meanwhile skips its re-sends and a batch stays `validating`
# (review of kills between commits). Set per session, as any user may: a pooler or a managed server
# keeps its own configuration.
SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "60000",  # ms
}


_KEEPALIVES_SQL = ", ".join(["set_config(%s, %s, false)"] * len(SERVER_KEEPALIVES))
_KEEPALIVES_PARAMS = tuple(part for pair in SERVER_KEEPALIVES.items() for part in pair)


def keep_server_alive(engine: Engine) -> Engine:
    """Every new connection of this engine sets the server's keepalives for its session (for the
    engines that name no embedder: the advisory locks' pool, a migration's connection, whose locks
    are the ones a lost host must free; review)."""

    @event.listens_for(engine, "connect")
    def _connected(dbapi_connection: Any, entry: Any) -> None:
        _set_up(dbapi_connection, "SELECT " + _KEEPALIVES_SQL, _KEEPALIVES_PARAMS)

    return engine


def _set_session(
    dbapi_connection: Any, embedder: str | None, version: int | None, first: bool = False
) -> None:
    """Name the embedder (when given) and the space version for the connection's session; on its
    `first` set-up, the server's keepalives too."""
    statement = "SELECT set_config('mlchat.space_version', %s, false)"
    params: tuple[str, ...] = ("" if version is None else str(version),)
    if embedder is not None:
        statement += ", set_config('mlchat.embedder', %s, false)"
        params += (embedder,)
    if first:
        statement += ", " + _KEEPALIVES_SQL
        params += _KEEPALIVES_PARAMS
    _set_up(dbapi_connection, statement, params)


def _set_up(dbapi_connection: Any, statement: str, params: tuple[str, ...]) -> None:
    """Run a connection's set-up statement, outside any transaction of its first user."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute(statement, params)
    if not dbapi_connection.autocommit:
        dbapi_connection.commit()


def _name_embedder(engine: Engine) -> Engine:
    """Every connection names this process's embedder (`mlchat.embedder`, for the session) and, once
    the process has checked its weights, the space version they were checked against
    (`mlchat.space_version`): the database stores no vector of another embedder and retrieval
    compares none (db/vector_space.py). Set by a statement, not as a startup option: the URL's own
    `options` and PGOPTIONS stay, and a pooler that refuses unknown startup options is no matter.
    The version costs a statement only on a connection's first checkout after it changed."""

    @event.listens_for(engine, "connect")
    def _connected(dbapi_connection: Any, entry: Any) -> None:  # both in the one set-up statement
        version = _space_version
        _set_session(dbapi_connection, settings.embedder, version, first=True)
        entry.info["space_version"] = version

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, entry: Any, _: Any) -> None:
        version = _space_version
        if entry.info.get("space_version") != version:
            _set_session(dbapi_connection, None, version)
            entry.info["space_version"] = version

    return engine


# A server that cannot take writes (SQLSTATE 25006): a primary demoted by a failover that a DNS name
# or a proxy still points at. Its connections pass the pool's pre-ping (SELECT 1) and would answer
# every write with this error until the process restarted.
READ_ONLY_SERVER = "25006"
# A session the server ended for the operator's idle or transaction timeouts
# (idle_in_transaction_session_timeout, transaction_timeout, idle_session_timeout): psycopg raises the
# first two as InternalError, which nothing took for the connection gone (review: a bare 500, a charged
# attempt). The connection is gone as surely as after a restart.
SESSION_ENDED_BY_SERVER = frozenset({"25P03", "25P04", "57P05"})


def _lost_sessions_are_outages(engine: Engine) -> Engine:
    """On this engine, a write refused by a read-only server, a session the server ended
    (SESSION_ENDED_BY_SERVER) or one the dialect saw drop under another error class drops its
    connection from the pool (the next checkout connects anew, to wherever the name points now) and
    is raised as an outage, an OperationalError whose connection was invalidated: a 503 to retry,
    an uncharged hand-back."""

    @event.listens_for(engine, "handle_error", retval=True)
    def _as_outage(context: Any) -> Any:
        orig = context.original_exception
        sqlstate = getattr(orig, "sqlstate", None)
        # A connection the dialect saw drop under an error of another class (InternalError) too.
        gone = context.is_disconnect and not isinstance(context.sqlalchemy_exception, OperationalError)
        if sqlstate != READ_ONLY_SERVER and sqlstate not in SESSION_ENDED_BY_SERVER and not gone:
            return None
        context.is_disconnect = True
        return OperationalError(
            context.statement, context.parameters, orig, connection_invalidated=True, hide_parameters=True
        )

    return engine


@cache
def get_engine() -> Engine:
    """The process's engine; pre-ping so a restarted PostgreSQL costs a reconnect, not an error."""
    return _lost_sessions_are_outages(
        _name_embedder(
            create_engine(
                database_url(),
                pool_pre_ping=True,
                pool_size=5,
                max_overflow=5,
                connect_args=CONNECT_ARGS,
                hide_parameters=True,
            )
        )
    )


@cache
def get_autocommit_engine() -> Engine:
    """For units of work that are one statement: autocommit (no BEGIN and COMMIT round trips) and no
    pre-ping (a stale connection fails its statement instead; the caller falls back to session_scope)."""
    return _lost_sessions_are_outages(
        _name_embedder(
            create_engine(
                database_url(),
                pool_size=5,
                max_overflow=5,
                isolation_level="AUTOCOMMIT",
                connect_args=CONNECT_ARGS,
                hide_parameters=True,
            )
        )
    )


@cache
def get_probe_engine() -> Engine:
    """For health probes: a connection of its own each time (no pool), so a probe answers while the
    request pool is exhausted by slow work, instead of queueing behind it and timing out (a
    liveness probe that times out under load restarts a replica that was only busy)."""
    connect_args = CONNECT_ARGS | {"connect_timeout": 5}
    return create_engine(database_url(), poolclass=NullPool, connect_args=connect_args, hide_parameters=True)


LOCK_POOL_KEPT = 2


@cache
def get_lock_engine() -> Engine:
    """For advisory locks held across a block (db/advisory_locks.py): a pool of their own, outside
    the request pool. A holder opens sessions inside its block, so with its lock connection taken
    from that pool, ten submissions at once held all ten and each waited for an eleventh (every
    request of the process with them) until the pool's timeout. It never waits either (a holder may
    take a second lock): up to LOCK_POOL_KEPT connections are kept for reuse, any more are opened and
    closed as locks need them."""
    engine = keep_server_alive(
        create_engine(
            database_url(),
            pool_size=LOCK_POOL_KEPT,
            max_overflow=-1,
            pool_pre_ping=True,
            connect_args=CONNECT_ARGS,
            hide_parameters=True,
        )
    )

    # Advisory locks are taken on a server in recovery as on a primary, and a demoted primary that
    # stays up passes pre-ping: a kept connection would go on locking there while other processes
    # lock on the new primary, the same lock held twice (review). Each checkout asks the server.
    @event.listens_for(engine, "checkout")
    def _on_the_primary(dbapi_connection: Any, entry: Any, proxy: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery()")
            in_recovery = cursor.fetchone()[0]
        if in_recovery:  # the pool drops the connection; raised as an outage (a 503, an uncharged retry)
            raise OperationalError(
                "SELECT pg_is_in_recovery()",
                None,
                psycopg.OperationalError(
                    "the server is in recovery (a demoted primary): its locks are not the fleet's"
                ),
                connection_invalidated=True,
            )

    return engine


@cache
def get_watch_engine() -> Engine:
    """For the streams' one status check of every reader of a process (streaming/hub.py): a
    connection of its own, so a request pool held by slow work (every connection out for its pool
    timeout) does not end every stream of the process with it (overload review), as the health
    probe has its own."""
    return _lost_sessions_are_outages(
        keep_server_alive(
            create_engine(
                database_url(),
                pool_size=1,
                max_overflow=0,
                pool_pre_ping=True,
                connect_args=CONNECT_ARGS,
                hide_parameters=True,
            )
        )
    )


def _forget_the_parents_connections() -> None:
    """In a forked child (a game server's multiprocessing, gunicorn's preload after mlchat was used):
    the pools drop the parent's connections without closing them, so parent and child never share a
    socket, each reading the other's replies (review)."""
    for made in (get_engine, get_autocommit_engine, get_lock_engine, get_watch_engine):
        if made.cache_info().currsize:
            made().dispose(close=False)


os.register_at_fork(after_in_child=_forget_the_parents_connections)


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


def given_or_own(session: Session | None) -> AbstractContextManager[Session]:
    """The caller's session, or one of its own (session_scope): a reader that writes files as it
    streams passes None, so each chunk is read in a transaction of its own and none stays open while
    it writes (a migration's lock would wait behind one)."""
    return nullcontext(session) if session is not None else session_scope()


def psycopg_connection(session: Session) -> psycopg.Connection[Any]:
    """The psycopg 3 connection under the session's current transaction (for COPY and type adapters)."""
    raw = session.connection().connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        raise TypeError(f"expected a psycopg 3 connection, got {type(raw).__name__}")
    return raw


# What the database's state raises (a lost or refused connection, a statement timeout, a deadlock, no
# pooled connection in time), as opposed to a bug: answered "try again", never as final.
DATABASE_OUTAGES: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeout)


DATABASE_AWAY = "the database is unreachable (DATABASE_URL; unset: the embedded server)"


def database_away(exc: BaseException) -> str | None:
    """One line naming the setting to look at when `exc` (or its cause) is the database away: a
    driver's text names a host or a socket, not DATABASE_URL; None otherwise."""
    lost = next((c for c in (exc, exc.__cause__) if isinstance(c, DBAPIError) and connection_lost(c)), None)
    if lost is None:
        # the pool's wait for a connection (no driver error to quote): an outage too
        return f"{DATABASE_AWAY}: no connection in time" if isinstance(exc, PoolTimeout) else None
    why = str(lost.orig).strip().splitlines()[0][:300] if str(lost.orig).strip() else type(lost.orig).__name__
    return f"{DATABASE_AWAY}: {why}"


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` is the database's connection going away (or none to be had in time), as
    opposed to an error of the work itself (a statement timeout, a deadlock, a full disk)."""
    if isinstance(exc, (InterfaceError, PoolTimeout)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True  # the dialect saw the connection drop, whatever class psycopg raised it as
    if not isinstance(exc, OperationalError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    # The server reports every error of a statement with its SQLSTATE; psycopg's own errors (a
    # connection refused, or lost before an answer) have none. 08: connection exceptions;
    # 57P01-57P03: the server shut down or is not taking connections yet.
    return not sqlstate or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")


def again_while_away(
    write: Callable[[], _T],
    *,
    within_s: float,
    first_wait_s: float,
    max_wait_s: float,
    stop: stop_base | None = None,
    also: Callable[[BaseException], bool] = lambda exc: False,
) -> _T:
    """`write()`, run again while the database is away (connection_lost: a restart, a failover), or
    for what `also` says (a deadlock), waiting `first_wait_s` then twice as long each time up to
    `max_wait_s`, no try begun past `within_s` (nor once `stop` says so); the last error raised, as is
    any other error at once."""
    stops = stop_before_delay(max(within_s, 0.0))
    for attempt in Retrying(
        retry=retry_if_exception(lambda exc: connection_lost(exc) or also(exc)),
        stop=stops if stop is None else stop_any(stops, stop),
        wait=wait_exponential(multiplier=first_wait_s, max=max_wait_s),
        reraise=True,
    ):
        with attempt:
            return write()
    raise AssertionError("unreachable: Retrying reraises the last error")


def rolled_back_for_a_conflict(exc: BaseException) -> bool:
    """Whether the server rolled the transaction back for a deadlock (40P01) or a serialization
    failure (40001): the same work run again can succeed."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return isinstance(exc, OperationalError) and sqlstate in ("40P01", "40001")


# Tries in all of a transaction the server keeps rolling back for conflicts: a deadlock between two
# writers ends with one of them run again and through, so a third is rare and a fourth a bug.
CONFLICT_TRIES = 3


def again_on_conflict(
    write: Callable[[], _T],
    *,
    what: str,
    tries: int = CONFLICT_TRIES,
    also: Callable[[BaseException], bool] = lambda exc: False,
) -> _T:
    """`write()`, a transaction of its own, run again when the server rolled it back for a deadlock
    or a serialization failure (it left nothing behind), or for what `also` says (a lock waited for
    past the transaction's own lock_timeout), up to `tries` times in all, a short random wait
    between (the two writers of a deadlock would meet again in step); the last conflict is raised,
    as is any other error at once."""

    def said(state: Any) -> None:
        orig = getattr(state.outcome.exception(), "orig", None)
        logger.info("%s rolled back (%s); run again", what, type(orig).__name__)

    for attempt in Retrying(
        retry=retry_if_exception(lambda exc: rolled_back_for_a_conflict(exc) or also(exc)),
        stop=stop_after_attempt(tries),
        wait=wait_random(0.0, 0.2),
        before_sleep=said,
        reraise=True,
    ):
        with attempt:
            return write()
    raise AssertionError("unreachable: Retrying reraises the last conflict")
