"""Liveness and readiness, without a key: which dependency answers, never an exception's text."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
# Threads of their own: a probe never waits for the request threads, all of which slow work may hold.
_PROBE_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="healthz")


_schema_seen_current = False  # once not behind this code, a schema never goes back: not read again


def _database_state() -> dict[str, str]:
    """`database`: ok or down; `schema`: ok, behind (this code's migrations have not run on it yet),
    or unknown (the database does not answer)."""
    global _schema_seen_current
    from db.migrate import SchemaBehind, schema_ahead
    from db.session import get_probe_engine

    try:
        with get_probe_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
            if not _schema_seen_current:
                try:
                    schema_ahead(conn)
                    _schema_seen_current = True  # current, or ahead (a rollback): neither goes back
                except SchemaBehind as exc:
                    logger.warning("health: %s", exc)
                    return {"database": "ok", "schema": "behind"}
        return {"database": "ok", "schema": "ok"}
    except Exception:
        logger.warning("health: the database does not answer", exc_info=True)
        return {"database": "down", "schema": "unknown"}


def _broker_up() -> bool:
    from tasks.app import app as celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        logger.warning("health: the broker does not answer", exc_info=True)
        return False


def _checks() -> dict[str, str]:
    return _database_state() | {"broker": "ok" if _broker_up() else "down"}


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """200 when the database and the broker both answer and the database's schema is not behind this
    code's migrations (`schema`: a replica started before `mlchat migrate` ran takes no traffic);
    503 naming what is not. Neither the request pool's connections nor its threads are used: a busy
    replica still answers."""
    checks = await asyncio.get_running_loop().run_in_executor(_PROBE_THREADS, _checks)
    healthy = all(state == "ok" for state in checks.values())
    body = {"status": "ok" if healthy else "unhealthy"} | checks
    return JSONResponse(body, status_code=200 if healthy else 503)
