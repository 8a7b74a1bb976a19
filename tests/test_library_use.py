"""mlchat's Python API inside a game backend's own process: its threads, its Celery app, its forks,
its own settings (review: the Python API as a library)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import select

from core.settings import PROJECT_ROOT, Settings
from db.models import Turn
from db.session import session_scope
from services import producer
from tests.conftest import new_conversation, sent_to_nobody


def _in_a_game_process(code: str) -> str:
    """`code` run by a fresh process pointed at the session's servers; its stdout."""
    from core.services import broker_url, database_url

    env = os.environ | {"DATABASE_URL": database_url(), "REDIS_URL": broker_url()}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_a_game_processs_own_celery_app_stays_its_current_app(world) -> None:
    """Review: the first enqueue made mlchat's Celery app the thread's current one, so the game's own
    `shared_task`s went to mlchat's broker and queue, where a worker dropped them."""
    out = _in_a_game_process(
        "import celery\n"
        "game = celery.Celery('game', broker='memory://')\n"
        "from celery import shared_task\n"
        "@shared_task(name='award_xp')\n"
        "def award_xp(): pass\n"
        "import tasks.generate  # what the first enqueue imports\n"
        "from celery import current_app\n"
        "print(current_app.main, award_xp.app.main)\n"
    )
    assert out.split() == ["game", "game"], out


def test_mlchats_own_names_of_the_servers_win_over_the_common_ones(monkeypatch) -> None:
    """Review: a game whose DATABASE_URL names its own database (another driver's, say) could not set
    MLCHAT_DATABASE_URL for mlchat: the common name won, and the process stopped on it."""
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://game@db/game")
    monkeypatch.setenv("MLCHAT_DATABASE_URL", "postgresql://mlchat@db/mlchat")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/3")
    monkeypatch.setenv("MLCHAT_REDIS_URL", "redis://broker:6379/0")
    found = Settings()
    assert found.database_url == "postgresql+psycopg://mlchat@db/mlchat"  # the driver named
    assert found.redis_url == "redis://broker:6379/0"


def test_fields_given_beside_a_request_are_added_to_it(world, monkeypatch) -> None:
    """Review: `enqueue_turn(template, idempotency_key=…)` dropped the key unsaid, so a retry after an
    EnqueueError stored (and answered) a second turn."""
    template = new_conversation() | {"message": "Any work around here?"}
    keys = [f"lib-{uuid.uuid4().hex}" for _ in range(2)]
    with sent_to_nobody(monkeypatch, "gen.library-check.live"):
        first = producer.enqueue_turn(template, idempotency_key=keys[0])
        again = producer.enqueue_turn(template, idempotency_key=keys[0])  # the retry
        other = producer.enqueue_turn(producer.as_request(template), idempotency_key=keys[1])
    assert first == again != other
    with session_scope() as s:
        stored = dict(
            s.execute(select(Turn.id, Turn.idempotency_key).where(Turn.id.in_([first, other]))).all()
        )
    assert stored == {first: keys[0], other: keys[1]}


def test_a_pool_with_no_connection_in_time_is_an_enqueue_error(world, monkeypatch) -> None:
    """Review: over HTTP a 503; the Python API's caller was handed the pool's own TimeoutError (its
    `except EnqueueError` retry never ran)."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    def no_connection(*_: object, **__: object) -> object:
        raise PoolTimeout("QueuePool limit of size 5 overflow 5 reached, connection timed out")

    class NoConnections:
        connect = staticmethod(no_connection)

    monkeypatch.setattr(producer, "get_autocommit_engine", NoConnections)
    monkeypatch.setattr(producer, "_store_turns", no_connection)
    with pytest.raises(producer.EnqueueError, match="database busy at enqueue .*; nothing was sent"):
        producer.enqueue_turn(new_conversation() | {"message": "Hello?"})


def test_a_forked_child_uses_connections_and_lookup_threads_of_its_own(world) -> None:
    """Review: a child forked after mlchat was used (gunicorn's preload, multiprocessing) took the
    parent's pooled connections (both reading replies on one socket) and the callback lookups' pool
    without its threads (a lookup queued there never ran)."""
    out = _in_a_game_process(
        "import os, sys\n"
        "from sqlalchemy import text\n"
        "from db.session import get_engine\n"
        "from services.callbacks import _ACCEPTANCE_SHARES as shares\n"
        "with get_engine().connect() as c: c.execute(text('SELECT 1'))\n"
        "shares.hold('t', 1); shares.submit('t', lambda: 1).result(5)\n"
        "parent = get_engine().pool.checkedin()\n"
        "from db.retrieval import _slice_engine\n"
        "from streaming.publisher import publisher\n"
        "_slice_engine(get_engine().url, 1); publisher()\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    from db.retrieval import _slice_engine\n"
        "    import streaming.publisher as sp\n"
        "    assert _slice_engine.cache_info().currsize == 0 and sp._publisher is None\n"
        "    kept = get_engine().pool.checkedin()\n"
        "    with get_engine().connect() as c: one = c.execute(text('SELECT 1')).scalar()\n"
        "    shares.hold('t', 1)\n"
        "    try: looked = shares.submit('t', lambda: 'looked up').result(5)\n"
        "    except Exception as exc: looked = type(exc).__name__\n"
        "    os.write(w, f'{kept} {one} {looked!r}'.encode()); os._exit(0)\n"
        "os.close(w); said = os.read(r, 1000).decode(); os.waitpid(pid, 0)\n"
        "with get_engine().connect() as c: c.execute(text('SELECT 1'))\n"
        "print(parent, said)\n"
    )
    parent, kept, one, looked = out.split(maxsplit=3)
    assert int(parent) >= 1 and (kept, one, looked.strip()) == ("0", "1", "'looked up'"), out


def test_waiting_for_a_reply_reads_less_often_as_it_waits_and_without_the_prompt(world, monkeypatch) -> None:
    """Review: wait_for_reply read the whole turn, prompt and all, ten times a second for as long as
    it waited: 500 players waiting were 5,000 reads a second on a 10-connection pool."""
    reads: list[bool] = []
    real = producer.read_turn

    def counted(*, session, turn_id, with_prompt=True):  # type: ignore[no-untyped-def]
        reads.append(with_prompt)
        return real(session=session, turn_id=turn_id, with_prompt=with_prompt)

    with sent_to_nobody(monkeypatch, "gen.library-wait-check.live"):
        turn_id = producer.enqueue_turn(new_conversation() | {"message": "Still there?"})
    monkeypatch.setattr(producer, "read_turn", counted)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still queued"):
        producer.wait_for_reply(turn_id, timeout=3)
    assert time.monotonic() - started >= 3
    assert not any(reads), reads  # none read its prompt
    assert len(reads) <= 7, len(reads)  # 0, 0.1, 0.3, 0.7, 1.5, 2.5, 3.0 s: not thirty


def test_times_a_fleet_reads_are_utc_and_say_so(world, capsys) -> None:
    """Clocks review: `mlchat run list` printed a run's time in the database session's zone with no
    zone named, and log lines carried local time with no offset: a fleet's lines from hosts of other
    zones did not line up."""
    import logging
    import re

    from core.logging import line_formatter
    from db.runs import create_run
    from scripts.cli import main as cli

    name = f"utc-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        create_run(session=s, name=name, model="m", file_hash="h", total=0)
    assert cli(["run", "list"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if name in x]
    assert re.search(r" \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC$", line), line
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    record.created, record.msecs = 3600.0 * 9, 0.0  # 09:00 UTC, whatever this host's zone
    for one_line in (False, True):
        said = line_formatter(one_line=one_line).format(record)
        assert said == "1970-01-01 09:00:00.000Z INFO x: hello", said
