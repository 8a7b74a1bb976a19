"""The embedded servers: idempotent start, visible to a second process, real PostgreSQL 18 + pgvector 0.8."""

import subprocess
import sys
from pathlib import Path

import psycopg
import redis

from core import embedded

ROOT = Path(__file__).resolve().parent.parent


def test_start_is_idempotent_and_a_second_process_finds_the_servers(services: Path) -> None:
    pg_url = embedded.start_postgres(services)
    assert embedded.start_postgres(services) == pg_url
    redis_url = embedded.start_redis(services)
    assert embedded.start_redis(services) == redis_url
    out = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "services", "status"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "postgres  running" in out and "redis     running" in out
    assert redis_url in out


def test_postgres_has_pgvector_and_redis_answers(services: Path) -> None:
    url = embedded.start_postgres(services).replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        server_major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
        vector_version = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()[0]
    assert server_major == 18
    assert vector_version.startswith("0.8")
    assert redis.Redis.from_url(embedded.start_redis(services)).ping()
