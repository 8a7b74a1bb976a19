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


def test_the_scenes_migration_moves_forward_over_rows_in_the_old_tables(scratch_db) -> None:
    _run(scratch_db, "upgrade", "0012")
    scratch_db.execute(
        text(
            "INSERT INTO characters (id, slug, name, language, description, personality, scenario,"
            " speech_style, example_dialogues, first_message, system_prompt, post_history_instructions)"
            " VALUES (1, 'old', 'Old', 'en', '', '', '', '', '[]', '', '', '')"
        )
    )
    scratch_db.execute(
        text(
            "INSERT INTO conversations (id, external_id, character_id, player_id, player_name)"
            " VALUES (1, 'c-old', 1, '', '')"
        )
    )
    scratch_db.execute(
        text("INSERT INTO messages (conversation_id, seq, role, content) VALUES (1, 1, 'user', 'hello')")
    )
    scratch_db.execute(
        text(
            "INSERT INTO turns (id, idempotency_key, request_hash, conversation_id, message, status, model,"
            " params, attempts) VALUES (gen_random_uuid(), 'k', 'h', 1, 'hello', 'done', 'm', '{}', 1)"
        )
    )
    scratch_db.commit()
    _run(scratch_db, "upgrade", "head")
    assert scratch_db.execute(text("SELECT speaker_id, speaker_name, content FROM messages")).one() == (
        None,
        None,
        "hello",
    )
    assert scratch_db.execute(text("SELECT character_id, scene_id, scene_step FROM turns")).one() == (
        None,
        None,
        None,
    )
    assert scratch_db.execute(text("SELECT count(*) FROM scenes")).scalar() == 0
