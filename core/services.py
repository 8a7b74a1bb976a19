"""Where the database and the broker are: the configured URLs, or the embedded servers started on demand."""

from __future__ import annotations

from functools import cache

from core.embedded import start_postgres, start_redis
from core.settings import settings


@cache
def database_url() -> str:
    """DATABASE_URL, or the embedded PostgreSQL's URL (started if needed)."""
    return settings.database_url or start_postgres(settings.state_dir, settings.embedded_pg_shared_buffers)


@cache
def broker_url() -> str:
    """REDIS_URL, or the embedded Redis's URL (started if needed)."""
    return settings.redis_url or start_redis(settings.state_dir)
