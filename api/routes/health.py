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


def _database_up() -> bool:
    from db.session import get_probe_engine

    try:
        with get_probe_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        logger.warning("health: the database does not answer", exc_info=True)
        return False


def _broker_up() -> bool:
    from tasks.app import app as celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        logger.warning("health: the broker does not answer", exc_info=True)
        return False


def _checks() -> dict[str, bool]:
    return {"database": _database_up(), "broker": _broker_up()}


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """200 when the database and the broker both answer; 503 naming the one that does not. Neither
    the request pool's connections nor its threads are used: a busy replica still answers."""
    checks = await asyncio.get_running_loop().run_in_executor(_PROBE_THREADS, _checks)
    body = {"status": "ok" if all(checks.values()) else "unhealthy"} | {
        name: "ok" if up else "down" for name, up in checks.items()
    }
    return JSONResponse(body, status_code=200 if all(checks.values()) else 503)
