"""Alembic owns the schema: up, down to base and up again on a scratch database; models match."""

from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from psycopg import sql
from sqlalchemy import Connection, create_engine, inspect, text

from db.migrate import alembic_config
from db.models import Base
from db.session import get_engine

SCRATCH = "mlchat_migration_test"


@pytest.fixture()
def scratch_db(services) -> Iterator[Connection]:
    url = get_engine().url
    admin = url.set(database="postgres").render_as_string(hide_password=False).replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(SCRATCH)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SCRATCH)))
    engine = create_engine(url.set(database=SCRATCH))
    with engine.connect() as connection:
        yield connection
    engine.dispose()


def _run(connection: Connection, action: str, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    getattr(command, action)(cfg, revision)
    connection.commit()


def test_upgrade_downgrade_upgrade(scratch_db: Connection) -> None:
    _run(scratch_db, "upgrade", "head")
    tables = set(inspect(scratch_db).get_table_names())
    assert {"characters", "conversations", "messages", "story_events", "turns", "runs"} <= tables
    assert "ix_story_events_embedding_hnsw" in {
        ix["name"] for ix in inspect(scratch_db).get_indexes("story_events")
    }
    assert (
        scratch_db.execute(text("SELECT count(*) FROM pg_extension WHERE extname = 'vector'")).scalar() == 1
    )

    _run(scratch_db, "downgrade", "base")
    assert set(inspect(scratch_db).get_table_names()) <= {"alembic_version"}
    assert (
        scratch_db.execute(text("SELECT count(*) FROM pg_extension WHERE extname = 'vector'")).scalar() == 0
    )

    _run(scratch_db, "upgrade", "head")
    assert "turns" in inspect(scratch_db).get_table_names()


def test_models_and_migrations_agree(services) -> None:
    with get_engine().connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
