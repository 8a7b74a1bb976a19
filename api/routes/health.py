"""Liveness and readiness, without a key: which dependency answers, never an exception's text."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from core.now_and_then import NowAndThen

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
# Threads of their own, one a check: a probe never waits for the request threads, all of which slow
# work may hold, and a check that hangs holds only its own.
_PROBE_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="healthz")
# How long a probe waits for each check: one still running past it is "down" (a dependency that
# hangs, rather than refuses, answered after its socket timeouts, a minute or more: every probe timed
# out, and their checks queued behind one another; review, stop 75).
CHECK_DEADLINE_S = 5.0
_running: dict[str, Future[Any]] = {}  # each check's latest run: a probe arriving meanwhile joins it

_schema_seen_current = False  # once not behind this code, a schema never goes back: not read again
_WRITABLE = text("SELECT NOT (pg_is_in_recovery() OR current_setting('transaction_read_only')::bool)")


def _database_state() -> dict[str, str]:
    """`database`: ok, read-only (a standby, or a primary demoted by a failover that the name still
    points at: every write would fail) or down; `schema`: ok, behind (this code's migrations have not
    run on it yet), or unknown (the database does not answer)."""
    global _schema_seen_current
    from db.migrate import SchemaBehind, schema_ahead
    from db.session import get_probe_engine

    try:
        with get_probe_engine().connect() as conn:
            writable = bool(conn.execute(_WRITABLE).scalar())
            database = "ok" if writable else "read-only"
            if not _schema_seen_current:
                try:
                    schema_ahead(conn)
                    _schema_seen_current = True  # current, or ahead (a rollback): neither goes back
                except SchemaBehind as exc:
                    logger.warning("health: %s", exc)
                    return {"database": database, "schema": "behind"}
        return {"database": database, "schema": "ok"}
    except Exception:
        logger.warning("health: the database does not answer", exc_info=True)
        return {"database": "down", "schema": "unknown"}


_PROBE_KEY = f"mlchat:healthz:{socket.gethostname()}:{os.getpid()}"
_WRITE_REFUSED = NowAndThen(3600.0)


def _broker_state() -> str:
    """ok, read-only (a replica after a failover: every publish would fail), full (at its maxmemory
    under noeviction, as README advises: it answers a ping and refuses every write) or down."""
    from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError, ResponseError

    from tasks.queues import probe_connection

    try:
        with probe_connection() as conn:
            conn.ensure_connection(max_retries=0)
            client = conn.default_channel.client
            client.ping()
            try:
                role = client.execute_command("ROLE")
            except ResponseError:  # a managed Redis may not allow ROLE: the write below tells
                role = [b"master"]
            first = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
            if first != "master":
                return "read-only"
            try:  # a write of its own, gone in 10 s (review: a full Redis was "ok" while every
                # enqueue failed as "broker unreachable")
                client.set(_PROBE_KEY, b"1", px=10_000)
            except OutOfMemoryError:
                logger.warning("health: the broker is full (maxmemory): it refuses every write")
                return "full"
            except ReadOnlyError:  # a replica that does not allow ROLE either
                return "read-only"
            except NoPermissionError:  # an ACL user kept to the service's keys: the ping is all
                if _WRITE_REFUSED.due() is not None:
                    logger.warning(
                        "health: the broker's user may not write %s: its writes go unchecked", _PROBE_KEY
                    )
                return "ok"
            except ResponseError as exc:  # it answers and refuses the write (MISCONF: its disk)
                logger.warning("health: the broker refuses writes: %s", str(exc)[:200])
                return "read-only"
            return "ok"
    except Exception:
        logger.warning("health: the broker does not answer", exc_info=True)
        return "down"


def _started(name: str, check: Callable[[], Any]) -> Future[Any]:
    """The check's run in progress, or a new one: a dependency that hangs holds one thread, however
    many probes ask meanwhile."""
    running = _running.get(name)
    if running is None or running.done():
        running = _running[name] = _PROBE_THREADS.submit(check)
    return running


async def _checks() -> dict[str, str]:
    database = asyncio.wrap_future(_started("database", _database_state))
    broker = asyncio.wrap_future(_started("broker", _broker_state))
    await asyncio.wait([database, broker], timeout=CHECK_DEADLINE_S)
    found: dict[str, str] = (
        database.result() if database.done() else {"database": "down", "schema": "unknown"}
    )
    return found | {"broker": broker.result() if broker.done() else "down"}


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """200 when the database and the broker both answer and take writes, and the database's schema is
    not behind this code's migrations (`schema`: a replica started before `mlchat migrate` ran takes
    no traffic); 503 naming what is not. Neither the request pool's connections nor its threads are
    used: a busy replica still answers, and within CHECK_DEADLINE_S whatever a dependency does."""
    checks = await _checks()
    healthy = all(state == "ok" for state in checks.values())
    body = {"status": "ok" if healthy else "unhealthy"} | checks
    return JSONResponse(body, status_code=200 if healthy else 503)
