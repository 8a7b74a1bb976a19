"""Alembic owns the schema: up, down to base and up again on a scratch database; models match."""

import threading
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.orm import Session

from db.migrate import alembic_config, include_name
from db.models import Base
from db.session import get_engine


def _run(connection: Connection, action: str, revision: str | None) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    # Migration 0018 builds its index CONCURRENTLY in an autocommit block, which needs Alembic to own
    # the transaction: end the one the inspection queries began.
    connection.commit()
    getattr(command, action)(cfg, *(() if revision is None else (revision,)))
    connection.commit()


def _migrating(engine: Any, revision: str, outcome: list[object]) -> threading.Thread:
    """An upgrade to `revision` on a connection of its own, in a thread (started): "done" goes in
    `outcome` when it ends, its lock timeout before that (the setting left on its connection), or the
    exception it raised."""

    def migrate() -> None:
        try:
            with engine.connect() as mine:
                _run(mine, "upgrade", revision)
                outcome.append(mine.execute(text("SHOW lock_timeout")).scalar())
            outcome.append("done")
        except Exception as exc:  # reported by the caller's assertions
            outcome.append(exc)

    thread = threading.Thread(target=migrate)
    thread.start()
    return thread


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


def test_a_database_created_for_another_embedders_dimension_stores_its_vectors(
    scratch_db: Connection, monkeypatch
) -> None:
    """Found in review: the migrations wrote vector(384) whatever MLCHAT_EMBEDDING_DIM said, so a
    768-d embedder could never be stored, and the worker's refusal told the operator to set the
    setting and migrate, which they had done."""
    from core.settings import settings
    from db.introspect import vector_column_dim

    monkeypatch.setattr(settings, "embedding_dim", 768)
    _run(scratch_db, "upgrade", "head")
    columns = [(t, c) for t in ("messages", "story_events", "facts") for c in ("embedding", "embedding_next")]
    with Session(scratch_db) as session:
        dims = {c: vector_column_dim(session=session, table=c[0], column=c[1]) for c in columns}
    assert set(dims.values()) == {768}, dims


# A character as the early schemas held one (0001's columns), for migrations over rows.
_OLD_CHARACTER = text(
    "INSERT INTO characters (id, slug, name, language, description, personality, scenario,"
    " speech_style, example_dialogues, first_message, system_prompt, post_history_instructions)"
    " VALUES (1, 'old', 'Old', 'en', '', '', '', '', '[]', '', '', '')"
)


def test_undoing_tenants_over_a_name_two_tenants_hold_is_refused_in_one_line(scratch_db: Connection) -> None:
    """Review (stop 76): going below 0008 with one conversation id in two tenants failed on
    PostgreSQL's unique violation halfway through its statements."""
    from alembic.util.exc import CommandError

    _run(scratch_db, "upgrade", "0008")
    scratch_db.execute(_OLD_CHARACTER)
    scratch_db.execute(
        text(
            "INSERT INTO conversations (external_id, player_id, player_name, character_id, tenant)"
            " VALUES ('c-1', 'p', 'P', 1, 'a'), ('c-1', 'p', 'P', 1, 'b')"
        )
    )
    scratch_db.commit()
    with pytest.raises(CommandError, match=r"0008 cannot be undone: 1 conversation ids are held by more"):
        _run(scratch_db, "downgrade", "0007")
    scratch_db.rollback()
    assert scratch_db.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0008"
    scratch_db.execute(text("DELETE FROM conversations WHERE tenant = 'b'"))
    scratch_db.commit()
    _run(scratch_db, "downgrade", "0007")


def test_models_and_migrations_agree(services) -> None:
    """Server defaults compared too (review, stop 76: runs.file_hash's, which 0002 created and the
    model lacked, went unseen; a rollback's older code inserts rows relying on such defaults)."""
    with get_engine().connect() as conn:
        opts = {"include_name": include_name, "compare_server_default": True}
        context = MigrationContext.configure(conn, opts=opts)
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_the_scenes_migration_moves_forward_over_rows_in_the_old_tables(scratch_db) -> None:
    _run(scratch_db, "upgrade", "0012")
    scratch_db.execute(_OLD_CHARACTER)
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


def _story_event_rows(connection: Connection) -> list[tuple]:
    return connection.execute(
        text("SELECT id, story, ordinal, scene, time, text, embedding::text FROM story_events ORDER BY id")
    ).all()


def _story_partitions_scanned(session: Session, *, story: str, vector: np.ndarray) -> int:
    """How many story_events partitions the batch retrieval for one turn of `story` really scanned."""
    from db.retrieval import _BATCH_CONTEXT_SQL, _HNSW_SETTINGS
    from db.vectors import send_vectors_binary

    send_vectors_binary(session)
    session.execute(_HNSW_SETTINGS, {"ef_search": "64"})
    params = dict(idx=[0], conv=[0], vec=[vector], story=[story], story_time=[4])
    params |= dict(recent_n=4, history_k=2, history_scan=10_000, story_k=3)
    plan = session.execute(
        text(f"EXPLAIN (ANALYZE, FORMAT JSON) {_BATCH_CONTEXT_SQL.text}"), params
    ).scalar_one()[0]["Plan"]
    scanned, nodes = set(), [plan]
    while nodes:  # a partition pruned at run time is in the plan with no loops ("never executed")
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if node.get("Relation Name", "").startswith("story_events_p") and node.get("Actual Loops", 0) > 0:
            scanned.add(node["Relation Name"])
    return len(scanned)


def test_story_events_move_into_story_partitions_with_their_rows(scratch_db: Connection) -> None:
    from db.retrieval import ContextQuery, fetch_batch_context

    _run(scratch_db, "upgrade", "0012")
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((40, 384)).astype(np.float32)
    for i, vec in enumerate(vectors):  # two stories, 20 events each, times 0..19
        scratch_db.execute(
            text(
                "INSERT INTO story_events (story, ordinal, scene, time, text, embedding)"
                " VALUES (:story, :ordinal, 'scene', :time, :text, CAST(:vec AS vector))"
            ),
            {
                "story": f"saga-{i % 2}",
                "ordinal": i // 2,
                "time": i // 2,
                "text": f"event {i}",
                "vec": "[" + ",".join(map(str, vec.tolist())) + "]",
            },
        )
    scratch_db.commit()
    before = _story_event_rows(scratch_db)

    _run(scratch_db, "upgrade", "head")
    assert _story_event_rows(scratch_db) == before
    strategy = scratch_db.execute(
        text("SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'story_events'::regclass")
    ).scalar()
    assert strategy == "h"
    placed = scratch_db.execute(
        text("SELECT count(DISTINCT tableoid), count(*) FROM story_events WHERE story = 'saga-0'")
    ).one()
    assert tuple(placed) == (1, 20)  # one story, one partition (one graph)
    homes = scratch_db.execute(
        text("SELECT DISTINCT tableoid::regclass::text FROM story_events ORDER BY 1")
    ).scalars()
    assert all(home.startswith("story_events_p") for home in homes)  # no row left in a parent
    partitions = set(
        scratch_db.execute(
            text(
                "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'story_events'::regclass"
            )
        ).scalars()
    )
    with_graph = set(
        scratch_db.execute(
            text(
                "SELECT tablename FROM pg_indexes WHERE tablename LIKE 'story_events_p%'"
                " AND indexdef LIKE '%USING hnsw (embedding vector_cosine_ops)%'"
            )
        ).scalars()
    )
    assert len(partitions) == 32 and with_graph == partitions  # every partition has its own graph
    new_id = scratch_db.execute(
        text(
            "INSERT INTO story_events (story, ordinal, scene, time, text)"
            " VALUES ('saga-0', 99, '', 0, 'later') RETURNING id"
        )
    ).scalar_one()
    assert new_id > max(row[0] for row in before)  # the id sequence moved with the rows

    # Retrieval reads the moved rows: the story and story-time filters, nearest first.
    session = Session(bind=scratch_db)
    query = vectors[8]  # event 8: saga-0, time 4
    (ctx,) = fetch_batch_context(
        session=session,
        queries=[ContextQuery(conversation_id=0, story="saga-0", story_time=4, vector=query)],
        recent_n=4,
        history_k=2,
        story_k=3,
    )
    assert ctx.events[0].text == "event 8" and ctx.events[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(ctx.events) == 3
    assert all(hit.time <= 4 and int(hit.text.split()[1]) % 2 == 0 for hit in ctx.events)
    assert _story_partitions_scanned(session, story="saga-0", vector=query) == 1
    session.rollback()
    scratch_db.execute(text("DELETE FROM story_events WHERE text = 'later'"))
    scratch_db.commit()

    _run(scratch_db, "downgrade", "0012")
    assert _story_event_rows(scratch_db) == before
    assert "ix_story_events_embedding_hnsw" in {
        ix["name"] for ix in inspect(scratch_db).get_indexes("story_events")
    }


def test_story_partitions_keep_every_column_and_have_statistics(scratch_db: Connection) -> None:
    _run(scratch_db, "upgrade", "0012")
    # a column some deployment (or a later-merged revision) added before 0014 must move with the rows
    scratch_db.execute(text("ALTER TABLE story_events ADD COLUMN mood text DEFAULT 'calm'"))
    scratch_db.execute(
        text(
            "INSERT INTO story_events (story, ordinal, scene, time, text, mood)"
            " VALUES ('saga-0', 0, 'inn', 0, 'a storm', 'grim'), ('saga-1', 0, 'inn', 0, 'a feast', DEFAULT)"
        )
    )
    scratch_db.commit()

    _run(scratch_db, "upgrade", "0014")
    moods = scratch_db.execute(text("SELECT text, mood FROM story_events ORDER BY id")).all()
    assert [tuple(row) for row in moods] == [("a storm", "grim"), ("a feast", "calm")]
    added = scratch_db.execute(
        text(
            "INSERT INTO story_events (story, ordinal, scene, time, text)"
            " VALUES ('saga-0', 1, '', 0, 'x') RETURNING mood"
        )
    ).scalar_one()
    assert added == "calm"  # its default moved too
    # analysed in the migration: autovacuum never analyses a partitioned parent
    analysed = scratch_db.execute(
        text("SELECT count(*) FROM pg_stats WHERE tablename = 'story_events' AND attname = 'story'")
    ).scalar_one()
    assert analysed == 1
    scratch_db.rollback()
    _run(scratch_db, "downgrade", "0012")
    assert "mood" in {c["name"] for c in inspect(scratch_db).get_columns("story_events")}


def test_the_fingerprint_migration_keeps_the_recorded_embedder_and_leaves_its_weights_to_fill(
    scratch_db: Connection,
) -> None:
    from db.models import VectorSpace
    from db.vector_space import fill_or_check

    _run(scratch_db, "upgrade", "0021")
    scratch_db.execute(text("INSERT INTO vector_space (embedder) VALUES ('bundled')"))
    scratch_db.commit()
    _run(scratch_db, "upgrade", "0022")
    row = scratch_db.execute(text("SELECT embedder, fingerprint IS NULL FROM vector_space")).one()
    assert tuple(row) == ("bundled", True)
    _run(scratch_db, "upgrade", "head")  # the processes' code: 0024's version starts at 1
    assert scratch_db.execute(text("SELECT version FROM vector_space")).scalar_one() == 1
    weights = np.random.default_rng(5).standard_normal(384).astype(np.float32)
    with Session(bind=scratch_db) as session:  # the first process of that name to load its embedder
        assert fill_or_check(session=session, embedder="bundled", fingerprint=weights) is True
        session.commit()
        assert np.allclose(session.scalar(select(VectorSpace.fingerprint)), weights)
    _run(scratch_db, "downgrade", "0021")
    assert scratch_db.execute(text("SELECT embedder FROM vector_space")).scalar_one() == "bundled"


def test_reembed_progress_recorded_before_its_fingerprint_column_is_started_over(
    scratch_db: Connection,
) -> None:
    from db.reembed import progress

    _run(scratch_db, "upgrade", "0022")
    scratch_db.execute(
        text(
            "INSERT INTO reembed_progress (table_name, embedder, last_id) VALUES ('messages', 'bundled', 40)"
        )
    )
    scratch_db.commit()
    _run(scratch_db, "upgrade", "0023")
    weights = np.random.default_rng(6).standard_normal(384).astype(np.float32)
    with Session(bind=scratch_db) as session:  # which weights made ids 1..40 is not known: all again
        assert progress(session=session, table="messages", embedder="bundled", fingerprint=weights) == 0
        session.execute(text("UPDATE reembed_progress SET last_id = 40"))
        session.expire_all()
        again = weights + np.float32(1e-6)  # the same weights on another device: resumed
        assert progress(session=session, table="messages", embedder="bundled", fingerprint=again) == 40
        session.commit()
    _run(scratch_db, "downgrade", "0022")
    assert scratch_db.execute(text("SELECT last_id FROM reembed_progress")).scalar_one() == 40


def test_files_take_the_tenant_of_the_runs_that_read_or_wrote_them(scratch_db: Connection) -> None:
    _run(scratch_db, "upgrade", "0024")
    for file_id in ("file-in", "file-out", "file-err", "file-alone"):
        scratch_db.execute(
            text(
                "INSERT INTO files (id, purpose, filename, bytes, path, api_key)"
                " VALUES (:id, 'batch', 'b.jsonl', 1, :path, 'k')"
            ),
            {"id": file_id, "path": f"{file_id}.jsonl"},
        )
    runs = (  # (name, key, tenant, input, output, error, created): the first of the file's own key decides
        ("batch_admin", "boss", "ops", "file-in", None, None, "2026-01-01"),  # an admin's batch of it
        ("batch_x", "k", "tenant-a", "file-in", "file-out", "file-err", "2026-01-02"),
        ("batch_later", "k", "tenant-b", "file-in", None, None, "2026-01-03"),  # the name, moved on
    )
    for name, key, tenant, input_id, output_id, error_id, created in runs:
        scratch_db.execute(
            text(
                "INSERT INTO runs (id, name, status, model, file_hash, total, api_key, tenant,"
                " input_file_id, output_file_id, error_file_id, created_at)"
                " VALUES (gen_random_uuid(), :name, 'completed', 'm', '', 0, :key, :tenant,"
                " :input, :output, :error, CAST(:created AS timestamptz))"
            ),
            {"name": name, "key": key, "tenant": tenant, "input": input_id, "output": output_id,
             "error": error_id, "created": created},
        )  # fmt: skip
    scratch_db.commit()
    _run(scratch_db, "upgrade", "0025")
    rows = dict(scratch_db.execute(text("SELECT id, tenant FROM files")).tuples().all())
    assert rows == {"file-in": "tenant-a", "file-out": "tenant-a", "file-err": "tenant-a", "file-alone": None}
    _run(scratch_db, "downgrade", "0024")
    assert scratch_db.execute(text("SELECT count(*) FROM files")).scalar_one() == 4


def test_two_processes_migrating_at_once_take_turns_without_deadlocking(scratch_db: Connection) -> None:
    """Found in review: every serverless container runs `upgrade` at start, with no lock; two cold
    starts raced on alembic_version and the DDL. Review of the lock: a process waiting for it inside
    a statement holds a snapshot, which the holder's CREATE INDEX CONCURRENTLY (0018, 0021) waits
    out while the waiter waits for the holder: a deadlock. The lock is polled."""
    import time

    import sqlalchemy

    from db.migrate import MIGRATION_LOCK_KEY

    _run(scratch_db, "upgrade", "head")
    engine = sqlalchemy.create_engine(scratch_db.engine.url)
    outcome: list[object] = []

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as holder:  # migrating
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        waiter = _migrating(engine, "head", outcome)
        time.sleep(1.5)
        assert outcome == []  # waits for the holder
        holder.execute(text("CREATE INDEX CONCURRENTLY ix_lock_probe ON turns (created_at)"))  # as 0018
        holder.execute(text("DROP INDEX CONCURRENTLY ix_lock_probe"))
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
    waiter.join(timeout=60)
    engine.dispose()
    assert outcome == ["0", "done"]


def test_a_rerun_after_an_interrupted_concurrent_build_rebuilds_the_invalid_index(scratch_db) -> None:
    """Found in review: an interrupted CREATE INDEX CONCURRENTLY leaves an INVALID index, which IF NOT
    EXISTS took as built; 0018 then dropped the index it replaces, leaving turns by run and status
    with no usable index."""
    _run(scratch_db, "upgrade", "0017")
    scratch_db.execute(text("CREATE INDEX ix_turns_run_status_id ON turns (run_id, status, id)"))
    scratch_db.execute(  # what an interrupted build leaves
        text("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_turns_run_status_id'::regclass")
    )
    _run(scratch_db, "upgrade", "0018")
    valid = scratch_db.execute(
        text("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_turns_run_status_id'::regclass")
    ).scalar()
    assert valid is True


def test_a_migration_waiting_for_a_tables_lock_gives_way_to_the_fleets_queries(
    scratch_db: Connection, monkeypatch
) -> None:
    """Found in review: a migration's ALTER TABLE turns (0031's new column) waited for its lock behind
    any long transaction reading turns (an export writing its file), and every query on turns queued
    behind the waiting ALTER: claims, stores and reads stood still until the export ended. The ALTER
    gives up after MLCHAT_MIGRATION_LOCK_TIMEOUT_S and the upgrade is tried again after a pause."""
    import time

    import sqlalchemy

    from core.settings import settings

    _run(scratch_db, "upgrade", "0030")
    monkeypatch.setattr(settings, "migration_lock_timeout_s", 0.3)
    engine = sqlalchemy.create_engine(scratch_db.engine.url)
    outcome: list[object] = []

    with engine.connect() as export:  # a long transaction reading turns
        export.execute(text("SELECT count(*) FROM turns")).scalar()
        waiter = _migrating(engine, "0031", outcome)
        # the migration has asked for turns' lock (review: a fixed pause let a slow machine ask
        # the fleet's query first)
        holder = export.execute(text("SELECT pg_backend_pid()")).scalar()
        deadline = time.monotonic() + 15
        with engine.connect() as look:
            while not look.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                {"pid": holder},
            ).scalar():
                look.rollback()
                assert time.monotonic() < deadline, "the migration never waited for turns' lock"
                time.sleep(0.05)
        with engine.connect() as fleet:  # a worker's claim, say: answered, not queued behind the ALTER
            fleet.execute(text("SET statement_timeout = '3s'"))
            assert fleet.execute(text("SELECT count(*) FROM turns")).scalar() == 0
            fleet.rollback()
        assert outcome == []  # the migration still waits its turn
        export.rollback()
    waiter.join(timeout=60)
    engine.dispose()
    assert outcome == ["0", "done"]  # the migration's connection has no lock timeout left on it
    columns = {c["name"] for c in inspect(scratch_db).get_columns("turns")}
    assert "engine_deaths_seen" in columns


def test_each_revision_commits_before_the_next_waits_for_a_lock(scratch_db: Connection, monkeypatch) -> None:
    """Found in review: an upgrade ran every pending revision in one transaction, so the locks of the
    first (0039 adds a column to turns: ACCESS EXCLUSIVE) were held while a later one (0042's column on
    characters) waited for its table, and every claim, store and read of turns stood still behind it.
    Each revision is a transaction of its own."""
    import time

    import sqlalchemy

    from core.settings import settings

    _run(scratch_db, "upgrade", "0038")
    monkeypatch.setattr(settings, "migration_lock_timeout_s", 20)
    engine = sqlalchemy.create_engine(scratch_db.engine.url)
    outcome: list[object] = []
    waiting = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'characters'::regclass")
    with engine.connect() as reader:  # a transaction reading characters: 0042's ALTER waits for it
        reader.execute(text("SELECT count(*) FROM characters")).scalar()
        waiter = _migrating(engine, "0042", outcome)
        with engine.connect() as fleet:
            for _ in range(600):
                if fleet.execute(waiting).scalar():
                    break
                fleet.rollback()
                time.sleep(0.1)
            fleet.rollback()
            assert outcome == [], outcome  # the migration waits for characters
            fleet.execute(text("SET lock_timeout = '1s'"))  # a claim: answered, not queued behind 0039
            assert fleet.execute(text("SELECT count(*) FROM turns")).scalar() == 0
            fleet.rollback()
        reader.rollback()
    waiter.join(timeout=60)
    engine.dispose()
    assert outcome[-1] == "done", outcome


def test_a_concurrent_index_build_waits_out_a_long_transaction_under_the_retry_window(
    scratch_db: Connection, monkeypatch, caplog
) -> None:
    """Review of the lock timeout: CREATE INDEX CONCURRENTLY waits for every older transaction to
    end (blocking no query meanwhile), and the timeout cut it short: each try left an INVALID index
    and scanned the table again, and the upgrade failed behind any transaction open for 5 s (0030's
    indexes behind a batch's finalizing). Concurrent builds and drops wait up to
    MLCHAT_MIGRATION_RETRY_S instead, in one try."""
    import time

    import sqlalchemy

    from core.settings import settings

    _run(scratch_db, "upgrade", "0029")
    monkeypatch.setattr(settings, "migration_lock_timeout_s", 0.3)
    monkeypatch.setattr(settings, "migration_retry_s", 30)
    engine = sqlalchemy.create_engine(scratch_db.engine.url)
    outcome: list[object] = []

    # a long transaction holding a snapshot (a batch's finalizing reads its turns in one), on another
    # table: a concurrent build waits for it to end
    with (
        caplog.at_level("WARNING"),
        engine.connect().execution_options(isolation_level="REPEATABLE READ") as finalizing,
    ):
        finalizing.execute(text("SELECT count(*) FROM runs")).scalar()
        waiter = _migrating(engine, "0030", outcome)
        try:
            time.sleep(1.5)
            waited = list(outcome)
        finally:
            finalizing.rollback()
            waiter.join(timeout=60)
    engine.dispose()
    assert waited == []  # the build waited
    assert outcome == ["0", "done"]
    assert "gave way" not in caplog.text  # in its one try, not cut short and built again
    invalid = scratch_db.execute(text("SELECT count(*) FROM pg_index WHERE NOT indisvalid")).scalar()
    assert invalid == 0


def test_a_database_behind_this_code_is_refused_and_one_ahead_is_left_as_it_is(
    scratch_db: Connection, caplog
) -> None:
    """Found in review: nothing compared the database's revision with this code's. A worker started
    before `mlchat migrate` ran loaded its engine, then failed every claim on a column it lacked; and
    rolling back to the release before failed its start-up migration (alembic does not know the
    newer revision), so no service of the older image started."""
    from db.migrate import SchemaBehind, check_schema, code_head

    _run(scratch_db, "upgrade", "0030")
    with pytest.raises(SchemaBehind, match=f"at revision 0030, this code needs {code_head()}: run `mlchat"):
        check_schema(scratch_db)
    _run(scratch_db, "upgrade", "head")
    # review: the commands that migrate nothing have no destination revision (alembic current)
    _run(scratch_db, "current", None)
    with caplog.at_level("WARNING", logger="db.migrate"):
        check_schema(scratch_db)  # at head: nothing to say
    assert caplog.text == ""
    scratch_db.execute(text("UPDATE alembic_version SET version_num = '9999'"))  # a newer release's
    scratch_db.commit()
    with caplog.at_level("WARNING"):
        check_schema(scratch_db)
        _run(scratch_db, "upgrade", "head")  # the older image's start-up migration: said, not failed
    said = f"at revision 9999, newer than this code's {code_head()} (a rollback?)"
    assert f"{said}; going on" in caplog.text  # the check a worker runs at start
    assert f"{said}: not migrating" in caplog.text  # the start-up migration

    assert scratch_db.execute(text("SELECT version_num FROM alembic_version")).scalar() == "9999"


def test_0035_runs_again_after_its_index_build_was_cut_off(scratch_db) -> None:
    """Found in review: 0035 adds the facts' source columns, then builds an index concurrently in an
    autocommit block, which commits the columns first; a build cut off (a lock timeout, a container
    killed) left them there under revision 0034, and every later upgrade failed on them (a duplicate
    column) until the schema was mended by hand."""
    _run(scratch_db, "upgrade", "0034")
    scratch_db.execute(
        text("ALTER TABLE facts ADD COLUMN source_conversation_id bigint")
    )  # what the cut left
    scratch_db.execute(text("ALTER TABLE facts ADD COLUMN source_first_seq integer"))
    scratch_db.execute(text("ALTER TABLE facts ADD COLUMN source_last_seq integer"))
    scratch_db.commit()
    _run(scratch_db, "upgrade", "0035")
    assert scratch_db.execute(
        text("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_facts_read_from_lines'::regclass")
    ).scalar()
    _run(scratch_db, "downgrade", "0034")
    assert not scratch_db.execute(
        text(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'facts'"
            " AND column_name IN ('source_conversation_id', 'source_first_seq', 'source_last_seq')"
        )
    ).scalar()
