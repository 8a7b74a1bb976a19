"""The HTTP ingest, served by a real uvicorn on loopback, called with a real HTTP client."""

import json
import re
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from core.settings import settings
from db.models import Turn, TurnStatus
from db.session import session_scope
from tests.conftest import new_conversation

KEY = {"X-API-Key": "test-key-1-abcdefgh"}


def _turn_count() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Turn))


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer nope"}])
def test_requests_without_a_valid_key_get_401_and_touch_nothing(base_url, headers) -> None:
    before = _turn_count()
    r = httpx.post(f"{base_url}/v1/turns", json=new_conversation() | {"message": "hi"}, headers=headers)
    assert r.status_code == 401
    assert (
        httpx.get(f"{base_url}/v1/turns/00000000-0000-0000-0000-000000000000", headers=headers).status_code
        == 401
    )
    assert _turn_count() == before


def test_health_and_openapi_are_published(base_url) -> None:
    assert httpx.get(f"{base_url}/healthz").json() == {
        "status": "ok",
        "database": "ok",
        "schema": "ok",
        "broker": "ok",
    }
    document = httpx.get(f"{base_url}/openapi.json").json()
    paths = document["paths"]
    assert {"/v1/turns", "/v1/turns:batch", "/v1/turns/{turn_id}", "/healthz"} <= set(paths)
    # the bodies validated off the event loop (api/off_loop.py) are still documented, refs resolving
    schemas = document["components"]["schemas"]
    for path, model in (
        ("/v1/turns", "TurnRequest"),
        ("/v1/turns:batch", "BatchRequest"),
        ("/v1/scenes", "GroupSpec"),
    ):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"] == f"#/components/schemas/{model}" and schemas[model]["properties"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs <= set(schemas), refs - set(schemas)


def test_bad_requests_get_clear_errors(base_url) -> None:
    r = httpx.post(f"{base_url}/v1/turns", json=new_conversation() | {"message": ""}, headers=KEY)
    assert r.status_code == 422 and "message is empty" in r.text
    r = httpx.post(f"{base_url}/v1/turns", json=new_conversation("nobody") | {"message": "hi"}, headers=KEY)
    assert r.status_code == 422 and "unknown character 'nobody'" in r.text
    r = httpx.post(
        f"{base_url}/v1/turns", json=new_conversation() | {"message": "hi", "role": "system"}, headers=KEY
    )
    assert r.status_code == 422 and "role" in r.text  # no way to smuggle a role in
    r = httpx.post(
        f"{base_url}/v1/turns",
        content=b"{" + b" " * 1_100_000 + b"}",
        headers=KEY | {"content-type": "application/json"},
    )
    assert r.status_code == 413
    key = {"Idempotency-Key": "http-" + new_conversation()["conversation"]}
    conv = new_conversation()
    assert (
        httpx.post(f"{base_url}/v1/turns", json=conv | {"message": "one"}, headers=KEY | key).status_code
        == 202
    )
    r = httpx.post(f"{base_url}/v1/turns", json=conv | {"message": "two"}, headers=KEY | key)
    assert r.status_code == 409


def test_mlchats_own_idempotency_keys_are_refused_in_the_header_as_in_the_body(base_url) -> None:
    """Found in review: the header was applied without the body field's check, so a turn could still
    take a run line's key (`run:<run id>:<custom_id>`) and drop that line."""
    before = _turn_count()
    for key in ("run:7f0c2b4e-0000-4000-8000-000000000000:line-1", "scene:1:2", "sha256:" + "ab" * 32):
        r = httpx.post(
            f"{base_url}/v1/turns",
            json=new_conversation() | {"message": "hi"},
            headers=KEY | {"Idempotency-Key": key},
        )
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "idempotency-key (header)", r.text
        assert "mlchat's own" in r.json()["message"]
        r = httpx.post(
            f"{base_url}/v1/turns",
            json=new_conversation() | {"message": "hi", "idempotency_key": key},
            headers=KEY,
        )
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "idempotency_key", r.text
    # Found in review: with both, the header was ignored; a retry sending only the header was a new turn.
    r = httpx.post(
        f"{base_url}/v1/turns",
        json=new_conversation() | {"message": "hi", "idempotency_key": "body-key-1"},
        headers=KEY | {"Idempotency-Key": "header-key-1"},
    )
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "idempotency-key (header)", r.text
    assert "differs from the body's idempotency_key" in r.json()["message"]
    # Found in review: the header was ignored on :batch (every retry stored every item again), and an
    # empty one meant "no key" on a single turn.
    items = {"turns": [new_conversation() | {"message": "hi"}]}
    r = httpx.post(f"{base_url}/v1/turns:batch", json=items, headers=KEY | {"Idempotency-Key": "batch-1"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "idempotency-key (header)", r.text
    r = httpx.post(
        f"{base_url}/v1/turns",
        json=new_conversation() | {"message": "hi"},
        headers=KEY | {"Idempotency-Key": ""},
    )
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "idempotency-key (header)", r.text
    assert _turn_count() == before


def test_submit_poll_reply_and_cancel_over_http(base_url, celery_worker) -> None:
    conv = new_conversation("elara") | {"player_name": "Rowan"}
    key = {"Idempotency-Key": "http-" + conv["conversation"]}
    first = httpx.post(
        f"{base_url}/v1/turns", json=conv | {"message": "Any news from the north road?"}, headers=KEY | key
    )
    assert first.status_code == 202
    retried = httpx.post(
        f"{base_url}/v1/turns", json=conv | {"message": "Any news from the north road?"}, headers=KEY | key
    )
    assert retried.json()["id"] == first.json()["id"]
    assert retried.status_code == 200 and retried.json()["created"] is False  # a replay, not a new turn
    batch = httpx.post(
        f"{base_url}/v1/turns:batch",
        headers=KEY,
        json={
            "turns": [
                new_conversation("luffy") | {"message": "선장, 배고파?"},
                new_conversation("haneul") | {"message": "이 책 빌릴 수 있나요?"},
            ]
        },
    )
    assert batch.status_code == 202 and len(batch.json()["ids"]) == 2
    turn_id = first.json()["id"]
    deadline = time.monotonic() + 240
    while True:
        body = httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=KEY).json()
        if body["status"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert body["status"] == "done", body
    assert body["reply"] and body["usage"]["completion_tokens"] > 0 and body["timings"]["generate_ms"] > 0
    replay = httpx.post(
        f"{base_url}/v1/turns", json=conv | {"message": "Any news from the north road?"}, headers=KEY | key
    )
    assert replay.status_code == 200 and replay.json()["status"] == "done"  # the real status, not "queued"
    r = httpx.delete(f"{base_url}/v1/turns/{turn_id}", headers=KEY)
    assert r.json() == {"id": turn_id, "cancelled": False, "status": "done"}
    assert (
        httpx.get(f"{base_url}/v1/turns/{'0' * 8}-0000-0000-0000-{'0' * 12}", headers=KEY).status_code == 404
    )


def test_cancel_a_queued_turn_over_http(base_url) -> None:
    from services.producer import enqueue_turns

    (turn_id,) = enqueue_turns([new_conversation() | {"message": "wait"}], send=False)
    r = httpx.delete(
        f"{base_url}/v1/turns/{turn_id}", headers={"Authorization": "Bearer test-key-2-abcdefgh"}
    )
    assert r.json()["cancelled"] is True
    with session_scope() as s:
        assert s.get(Turn, turn_id).status == TurnStatus.CANCELLED


def test_the_ingest_publishes_prometheus_metrics(base_url) -> None:
    httpx.post(f"{base_url}/v1/turns", json=new_conversation() | {"message": "hi"}, headers={})  # a 401
    body = httpx.get(f"{base_url}/metrics", headers={"X-API-Key": "test-key-1-abcdefgh"}).text
    assert 'mlchat_ingest_requests_total{method="POST",route="/v1/turns",status="401"}' in body
    assert 'mlchat_queue_depth{queue="gen.smollm2-135m"}' in body
    assert 'mlchat_queue_depth{queue="gen.smollm2-135m.bulk"}' in body
    # review: the ingest exported a worker's engine gauge it never sets (`mlchat_engine_up 0`): an
    # engine-down alert firing on every API target
    assert "mlchat_engine_up" not in body and "mlchat_stream_readers" in body


def test_a_request_that_raises_is_counted_as_a_500(world) -> None:
    """Found in review: a route's unhandled exception came back through the counting middleware as a
    raise, so no status="500" series was ever counted."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from core import metrics

    app = create_app()

    @app.get("/v1/raises-for-the-test")
    def raises() -> None:
        raise RuntimeError("a bug")

    counter = metrics.INGEST_REQUESTS.labels("GET", "/v1/raises-for-the-test", "500")
    before = counter._value.get()
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: its end closes the hub
    assert client.get("/v1/raises-for-the-test").status_code == 500
    assert counter._value.get() == before + 1


def test_a_live_turn_past_its_models_queue_limit_is_a_503_to_try_again_and_nothing_is_stored(
    world, monkeypatch
) -> None:
    """Overload review: the live lane took every turn (202) whatever its backlog; under ten times the
    load the fleet serves, each waited past its player's patience (a chat completion's 504) and was
    answered all the same, the fleet busy and nobody served. Past MLCHAT_LIVE_QUEUE_MAX messages
    waiting, a new live turn is refused before anything is stored, with a Retry-After."""
    import uuid

    from fastapi.testclient import TestClient
    from sqlalchemy import update

    from api.main import create_app
    from services import producer
    from services.producer import LiveQueueFull, enqueue_turns

    model = f"door-{uuid.uuid4().hex[:6]}"  # a served model nobody consumes: its messages wait
    monkeypatch.setattr(settings, "served_models", [settings.model, model])
    monkeypatch.setattr(settings, "live_queue_max", 2)
    producer._live_depths.clear()
    waiting = enqueue_turns(
        [new_conversation() | {"message": f"Line {i}.", "model": model} for i in range(2)]
    )
    try:
        producer._live_depths.clear()  # read afresh, not the reading of a second ago
        client = TestClient(
            create_app(), raise_server_exceptions=False
        )  # no lifespan: its end closes the hub
        conversation = new_conversation()
        r = client.post("/v1/turns", headers=KEY, json=conversation | {"message": "Hello?", "model": model})
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "MLCHAT_LIVE_QUEUE_MAX" in r.json()["detail"]
        with session_scope() as s:  # nothing stored
            assert not s.scalar(
                select(func.count()).select_from(Turn).where(Turn.message == "Hello?", Turn.model == model)
            )
        with pytest.raises(LiveQueueFull):  # the Python API and the CLI too
            enqueue_turns([conversation | {"message": "Again?", "model": model}])
        # an OpenAI-shaped 503 for a chat completion; a batch's lines (the bulk lane) are never refused
        producer._live_depths[settings.model] = (time.monotonic() + 60, 10**6)
        chat = {"model": "elara", "messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", headers=KEY, json=chat)
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "try again" in r.json()["error"]["message"]
    finally:
        producer._live_depths.clear()
        with session_scope() as s:
            s.execute(update(Turn).where(Turn.id.in_(waiting)).values(status=TurnStatus.CANCELLED))


def test_a_made_up_http_method_is_counted_as_other_not_as_a_series_of_its_own(world) -> None:
    """Found in review: the method was a label as the client sent it; behind an HTTP parser that takes
    any token (h11), each made-up method started a series, without bound."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from core import metrics

    client = TestClient(create_app(), raise_server_exceptions=False)  # no lifespan: its end closes the hub
    for n in range(3):
        client.request(f"FOO{n}", "/v1/turns")
    series = {sample.labels["method"] for sample in metrics.INGEST_REQUESTS.collect()[0].samples}
    assert "other" in series and not any(m.startswith("FOO") for m in series), series


def test_a_scrape_with_the_broker_away_answers_without_waiting_out_its_retries(monkeypatch) -> None:
    """Found in review: each queue's depth opened its own connection with the broker's retries
    (sleeps of 2 and 4 s each), so a scrape during a Redis blip took longer than Prometheus's timeout
    and the worker's health check (which reads /metrics within 5 s) called every worker dead."""
    import socket

    import kombu.utils.functional
    from kombu import Connection

    from core.metrics import QueueDepthCollector
    from tasks.app import app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setattr(app, "connection_for_read", lambda: Connection(f"redis://127.0.0.1:{closed}/0"))
    slept: list[float] = []
    monkeypatch.setattr(kombu.utils.functional, "sleep", slept.append)
    (family,) = QueueDepthCollector().collect()
    assert family.name == "mlchat_queue_depth" and family.samples == [] and slept == []


def test_the_ingest_metrics_need_an_admin_key_unless_made_public(base_url, monkeypatch) -> None:
    from tests.conftest import INGEST_KEY

    assert httpx.get(f"{base_url}/metrics").status_code == 401
    assert httpx.get(f"{base_url}/metrics", headers={"X-API-Key": INGEST_KEY}).status_code == 403
    admin = httpx.get(f"{base_url}/metrics", headers={"Authorization": "Bearer test-key-2-abcdefgh"})
    assert admin.status_code == 200 and "mlchat_ingest_requests_total" in admin.text
    monkeypatch.setattr(settings, "api_metrics_public", True)
    public = httpx.get(f"{base_url}/metrics")
    assert public.status_code == 200 and "mlchat_ingest_requests_total" in public.text


def test_cards_story_events_and_manifests_over_http(base_url, engine, monkeypatch) -> None:
    from pathlib import Path

    from services.producer import enqueue_turns
    from worker.pipeline import process_batch

    card = (Path(__file__).parent / "fixtures" / "cards" / "iro_v3.json").read_bytes()
    assert httpx.post(f"{base_url}/v1/characters:import", content=card).status_code == 401
    r = httpx.post(f"{base_url}/v1/characters:import", params={"slug": "iro-http"}, content=card, headers=KEY)
    assert r.status_code == 201 and r.json()["slug"] == "iro-http"
    bad = httpx.post(f"{base_url}/v1/characters:import", content=b'{"spec": "x"}', headers=KEY)
    assert bad.status_code == 422 and "unsupported card spec 'x'" in bad.json()["detail"]
    exported = httpx.get(f"{base_url}/v1/characters/iro-http/card", headers=KEY)
    assert exported.json() == json.loads(card)
    png = httpx.get(f"{base_url}/v1/characters/iro-http/card", params={"format": "png"}, headers=KEY)
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    assert httpx.get(f"{base_url}/v1/characters/nobody/card", headers=KEY).status_code == 404

    story = "http-story-" + new_conversation()["conversation"]
    event = httpx.post(
        f"{base_url}/v1/stories/{story}/events", json={"text": "Fox spirits were seen at dusk."}, headers=KEY
    )
    assert event.status_code == 201 and event.json()["ordinal"] == 1

    conv = new_conversation("iro-http") | {"story": story}
    (turn_id,) = enqueue_turns([conv | {"message": "Are there foxes in this forest?"}], send=False)
    early = httpx.get(f"{base_url}/v1/turns/{turn_id}/manifest", headers=KEY)
    assert early.status_code == 409  # queued: no prompt yet
    process_batch([turn_id])
    manifest = httpx.get(f"{base_url}/v1/turns/{turn_id}/manifest", headers=KEY).json()
    assert manifest["lore"][0]["reason"] == "key '/fox(es)?/i' in the player's message"
    assert manifest["events"][0]["id"] == event.json()["id"]
    assert sum(manifest["sections"].values()) == manifest["prompt_tokens"]
    # Review (stop 76): a manifest the retention forgot is gone (410), not "no prompt yet"
    from sqlalchemy import update

    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id == turn_id).values(prompt=None, context=None))
    monkeypatch.setattr(settings, "prompt_retention_days", 30)
    gone = httpx.get(f"{base_url}/v1/turns/{turn_id}/manifest", headers=KEY)
    assert gone.status_code == 410 and "MLCHAT_PROMPT_RETENTION_DAYS" in gone.json()["detail"]
    # Review of error texts (stop 79): a turn that ended before its prompt was built was a 409 "no
    # prompt yet", which invites a retry; it never will have one
    (cancelled,) = enqueue_turns([conv | {"message": "Never mind."}], send=False)
    assert httpx.delete(f"{base_url}/v1/turns/{cancelled}", headers=KEY).status_code == 200
    never = httpx.get(f"{base_url}/v1/turns/{cancelled}/manifest", headers=KEY)
    assert never.status_code == 404 and "holds no prompt" in never.json()["detail"], never.text


def test_a_database_outage_under_a_request_is_a_503_to_retry_never_a_500_nor_the_drivers_text(
    base_url, monkeypatch
) -> None:
    """Found in review: no handler mapped the database's errors, so an outage under GET, DELETE, the
    stream, scenes, facts or files was a 500 (and the pool's own timeout one too), and no 503 said
    when to try again."""
    import uuid

    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from services import producer

    for error in (
        OperationalError("SELECT", {}, Exception('password authentication failed for user "mlchat_prod"')),
        PoolTimeout("QueuePool limit of size 10 overflow 0 reached, connection timed out"),
    ):

        def down(turn_id, error=error, **_):  # type: ignore[no-untyped-def]
            raise error

        monkeypatch.setattr(producer, "get_turn", down)
        r = httpx.get(f"{base_url}/v1/turns/{uuid.uuid4()}", headers=KEY)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "try again" in r.json()["detail"] and "mlchat_prod" not in r.text and "QueuePool" not in r.text
        assert "unavailable" in r.json()["detail"]

    # a deadlock (40P01) is a write that met another's, not the database away: said so
    import psycopg

    deadlock = psycopg.errors.DeadlockDetected("deadlock detected")
    monkeypatch.setattr(
        producer,
        "get_turn",
        lambda turn_id, **_: (_ for _ in ()).throw(OperationalError("UPDATE", {}, deadlock)),
    )
    r = httpx.get(f"{base_url}/v1/turns/{uuid.uuid4()}", headers=KEY)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["detail"].startswith("the request's write conflicted with another's"), r.text


def test_a_read_only_database_is_an_outage_whose_connections_the_pool_drops(base_url) -> None:
    """Found in review: a primary demoted by a failover (a name or proxy still pointing at it) answers
    writes with SQLSTATE 25006, an InternalError: every write was a 500 and the pool, whose pre-ping
    a read-only server passes, kept those connections until the process restarted."""
    from sqlalchemy import text

    from db.session import connection_lost, get_autocommit_engine, get_engine

    with get_engine().connect() as conn:
        conn.execute(text("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"))
        conn.commit()
        with pytest.raises(OperationalError) as refused:
            conn.execute(text("UPDATE turns SET message = message WHERE false"))
        assert connection_lost(refused.value) and conn.invalidated  # dropped, not pooled again

    database = get_engine().url.database
    with get_engine().connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'))
        conn.commit()
    for engine in (get_engine(), get_autocommit_engine()):
        engine.dispose()  # the API's next connections are the demoted primary's
    try:
        r = httpx.post(f"{base_url}/v1/turns", headers=KEY, json={**new_conversation(), "message": "Hi."})
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    finally:
        with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SET default_transaction_read_only = off"))
            conn.execute(text(f'ALTER DATABASE "{database}" RESET default_transaction_read_only'))
        for engine in (get_engine(), get_autocommit_engine()):
            engine.dispose()
    r = httpx.post(f"{base_url}/v1/turns", headers=KEY, json={**new_conversation(), "message": "Hi."})
    assert r.status_code == 202, r.text


def test_a_session_the_server_ended_for_its_timeouts_is_an_outage(world) -> None:
    """Review (database errors): a session the server ended for the operator's
    idle_in_transaction_session_timeout came back as an InternalError that nothing took for the
    connection gone: a bare 500 at the API, a charged attempt at a worker."""
    from sqlalchemy import text

    from db.session import connection_lost, get_engine

    with get_engine().connect() as conn:
        conn.execute(text("SET idle_in_transaction_session_timeout = '200ms'"))
        conn.commit()
        conn.execute(text("SELECT 1"))  # a transaction left open past the timeout
        time.sleep(1.0)
        with pytest.raises(OperationalError) as ended:
            conn.execute(text("SELECT 1"))
        assert connection_lost(ended.value) and conn.invalidated, ended.value


def test_a_lock_is_never_taken_on_a_server_in_recovery(world) -> None:
    """Review (database errors): advisory locks are granted on a server in recovery as on a primary,
    and a demoted primary that stays up passes pre-ping: the lock pool's kept connections went on
    locking there while other processes locked on the new primary. A server in recovery is made here
    by a function ahead of pg_catalog's on the connection's search path."""
    from sqlalchemy import text

    from db.session import connection_lost, get_lock_engine

    engine = get_lock_engine.__wrapped__()  # its own pool, with the lock engine's checks
    with engine.connect() as conn:
        conn.execute(text("CREATE SCHEMA IF NOT EXISTS demoted"))
        conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION demoted.pg_is_in_recovery() RETURNS boolean"
                " LANGUAGE sql AS 'SELECT true'"
            )
        )
        conn.execute(text("SET search_path = demoted, pg_catalog, public"))  # this connection's, pooled
        conn.commit()
    try:
        with pytest.raises(OperationalError) as refused:
            engine.connect()
        assert connection_lost(refused.value)
        with engine.connect() as conn:  # the connection dropped: a new one is the primary's
            assert conn.execute(text("SELECT pg_is_in_recovery()")).scalar() is False
    finally:
        engine.dispose()
        with get_lock_engine().connect() as conn:
            conn.execute(text("DROP SCHEMA demoted CASCADE"))
            conn.commit()


def test_a_database_errors_text_never_carries_a_players_words(world) -> None:
    """Found in review: SQLAlchemy writes a failed statement's parameters into the error's text (300
    characters a value: a player's message, a history, a prompt), and outages are logged with it."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from db.session import get_autocommit_engine, get_engine

    for engine in (get_engine(), get_autocommit_engine()):
        with engine.connect() as conn, pytest.raises(DBAPIError) as refused:
            conn.execute(text("SELECT CAST(:said AS text), 1 / 0"), {"said": "my sister Mira stole the ring"})
        assert "Mira" not in str(refused.value) and "parameters hidden" in str(refused.value)


def _wait_until_it_answers(base: str, api: Any, log: Any) -> None:
    """Until the API process at `base` answers its health check (90 s; its log's tail if not)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code in (200, 503):
                return
        except httpx.HTTPError:
            pass
        assert api.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def test_the_ingests_metrics_under_several_processes_count_every_processs_requests(world, tmp_path) -> None:
    """Found in review: under `mlchat api --workers N` each process kept its own counters and a
    scrape showed whichever answered (its counter seemed to reset at every scrape). Each writes its
    values where every scrape reads them all."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "api.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    api = subprocess.Popen(
        [sys.executable, "-m", "scripts.cli", "api", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_it_answers(base, api, tmp_path / "api.log")
        for _ in range(20):  # fresh connections: the processes share the listening socket
            assert httpx.post(f"{base}/v1/turns", json={}, headers={}).status_code == 401
        counted = re.compile(
            r'mlchat_ingest_requests_total\{method="POST",route="/v1/turns",status="401"\} (\S+)'
        )
        for _ in range(6):  # whichever process answers the scrape
            body = httpx.get(f"{base}/metrics", headers=KEY).text
            match = counted.search(body)
            assert match is not None and float(match[1]) == 20.0, body[-2000:]
            assert "mlchat_engine_up" not in body and 'mlchat_queue_depth{queue="gen.smollm2-135m"}' in body
    finally:
        api.terminate()
        api.wait(timeout=30)


def test_a_sigterm_stops_the_api_as_a_server_not_as_an_interrupted_command(tmp_path) -> None:
    """Review's suspicion, checked: `mlchat` turns SIGTERM into Ctrl-C for its commands, and uvicorn,
    after its graceful shutdown, raises SIGTERM again under the handler it found; uvicorn.run takes
    the KeyboardInterrupt that makes, so `docker stop` of the API still ends it cleanly, exit 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "api.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("w") as out:
        api = subprocess.Popen(
            [sys.executable, "-m", "scripts.cli", "api", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_it_answers(f"http://127.0.0.1:{port}", api, log)
        api.send_signal(signal.SIGTERM)
        code = api.wait(timeout=60)
    finally:
        api.kill()
    said = log.read_text()
    assert code == 0 and "Application shutdown complete" in said and "interrupted" not in said, (code, said)


def test_a_scrape_under_several_processes_sums_every_processs_values_and_forgets_the_dead(
    tmp_path, monkeypatch
) -> None:
    """The same, without leaving which process answers to chance: two processes that wrote their
    values (one of them gone without its shutdown, as uvicorn kills a child that hangs) are summed
    by any scrape, and the gone one's live readers are not."""
    import os
    import subprocess
    import sys

    from prometheus_client import generate_latest

    from api.routes import metrics as metrics_route

    child = (
        "from core import metrics\n"
        "metrics.INGEST_REQUESTS.labels('POST', '/v1/turns', '401').inc(5)\n"
        "metrics.STREAM_READERS.inc(3)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", child], env=env, check=True, capture_output=True, timeout=120)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    body = generate_latest(metrics_route._INGEST).decode()
    assert 'mlchat_ingest_requests_total{method="POST",route="/v1/turns",status="401"} 10.0' in body
    assert "mlchat_stream_readers 0.0" in body or "mlchat_stream_readers " not in body  # both gone
    assert "mlchat_engine_up" not in body and 'mlchat_queue_depth{queue="gen.smollm2-135m"}' in body


def test_a_worker_and_a_replica_started_before_the_migration_say_so(base_url, monkeypatch) -> None:
    """Found in review: a worker started against a database behind its code passed its start-up check
    (only the vector column's size) and loaded its engine for minutes, then failed every claim on a
    column the schema lacked; an API replica answered /healthz 200 and then 500s."""
    from api.routes import health
    from db import migrate
    from db.migrate import SchemaBehind
    from worker.startup import check_and_warm_up

    monkeypatch.setattr(migrate, "code_head", lambda: "0099")  # this code is newer than the database
    monkeypatch.setattr(health, "_schema_seen_current", False)
    with pytest.raises(SchemaBehind, match="this code needs 0099: run `mlchat migrate` first"):
        check_and_warm_up(load_engine=False)
    r = httpx.get(f"{base_url}/healthz")
    assert r.status_code == 503 and r.json()["schema"] == "behind", r.text
    monkeypatch.undo()
    monkeypatch.setattr(health, "_schema_seen_current", False)
    r = httpx.get(f"{base_url}/healthz")
    assert r.status_code == 200 and r.json()["schema"] == "ok", r.text


def test_an_unusable_metrics_folder_is_one_line_before_any_process_starts(world, monkeypatch, capsys) -> None:
    """Found in review: a PROMETHEUS_MULTIPROC_DIR that does not exist (or that the user cannot write)
    was not checked: each child of `mlchat api --workers N` died importing its metrics, uvicorn
    started it again for ever with a traceback each time, and with one process the error was a bare
    "[Errno 2] …" naming no variable."""
    import uvicorn

    from scripts.cli import main as cli

    started: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append(a))  # nothing must start
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent/mlchat-metrics")
    for workers in ("1", "2"):
        assert cli(["api", "--workers", workers]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            "mlchat: PROMETHEUS_MULTIPROC_DIR: '/nonexistent/mlchat-metrics' is not a folder"
        )
        assert err.count("\n") == 1, err
    assert started == []


def test_a_request_line_or_header_past_the_bound_is_refused_before_it_fills_the_memory(base_url) -> None:
    """Found in review: uvicorn served with httptools (installed beside it and picked by default),
    which grows a request's URL and each header value without a bound on the event loop: one
    connection with no key could send a URL or an Idempotency-Key of a gigabyte, filling the memory
    and stalling every tenant, and no 414 or 431 ever came. Served with h11, it is refused at 64 KiB."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(base_url)
    for head in (
        b"GET /v1/turns/" + b"a" * 32_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nIdempotency-Key: " + b"k" * 32_000_000 + b"\r\n\r\n",
    ):
        with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
            sent = 0
            try:
                while sent < len(head):
                    sent += sock.send(head[sent : sent + 65536])
            except OSError:  # refused and closed under the sending: what is wanted
                pass
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
        assert sent < len(head), "the whole oversized request was read"
    # A path as HTTP has it, percent-encoded, reaches the app (a 401 of its own, no key); raw UTF-8
    # bytes are refused by h11 before it (said in the README).
    encoded = httpx.get(f"{base_url}/v1/players/%EB%AF%BC%EC%88%98/facts")
    assert encoded.status_code == 401 and encoded.json()["detail"] == "missing or invalid API key"


def test_an_upload_the_client_breaks_off_is_no_server_error(world) -> None:
    """Found in review: a client closing the connection mid-body (a timeout, a cancelled upload of a
    batch file or a card) raised Starlette's ClientDisconnect through every route that reads a body:
    a traceback in the log and a 500 in the metrics, for what the client did."""
    import asyncio

    from api.main import create_app
    from core import metrics

    app = create_app()
    counter = metrics.INGEST_REQUESTS.labels("POST", "/v1/characters:import", "500")
    before = counter._value.get()
    parts = [
        {"type": "http.request", "body": b'{"message": "Ha', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/characters:import",
        "raw_path": b"/v1/characters:import",
        "query_string": b"",
        "headers": [
            (b"host", b"x"),
            (b"content-type", b"application/json"),
            (b"content-length", b"5000"),
            (b"x-api-key", b"test-key-1-abcdefgh"),  # an admin key
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 400 and counter._value.get() == before


def test_a_json_body_sent_without_a_content_type_is_told_so_and_a_key_beyond_latin1_works_in_a_header(
    base_url,
) -> None:
    """Found in review: FastAPI hands a body with no content-type on as bytes, so a valid turn sent so
    (requests' data=json.dumps(...)) was told it was not an object; and a key beyond Latin-1, which
    signs in at the desk, was a 401 in a header (read as Latin-1 mojibake)."""
    from tests.conftest import INGEST_KEY, REVIEW_KEY, UNICODE_REVIEW_KEY

    turn = json.dumps(new_conversation() | {"message": "Hello?"}).encode()
    erase = json.dumps({"conversations": ["nobody-here"]}).encode()
    for path, body in (("/v1/turns", turn), ("/v1/players/p-none:erase", erase)):
        answer = httpx.post(f"{base_url}{path}", headers={"X-API-Key": INGEST_KEY}, content=body)
        missing = answer.status_code == 415 and answer.json()["detail"].startswith("content-type: missing")
        assert missing, (path, answer.text)
        # review: the body's check came before the key's, so a keyless request was told about its body
        keyless = httpx.post(f"{base_url}{path}", content=body)
        assert keyless.status_code == 401, (path, keyless.text)
        # review: a keyless body FastAPI could not parse (before any dependency) was told why, not 401
        for broken in (b'{"message": ', b"\xff\xfe{}"):
            headers = {"content-type": "application/json"}
            keyless = httpx.post(f"{base_url}{path}", content=broken, headers=headers)
            assert keyless.status_code == 401, (path, broken, keyless.text)
            keyed = httpx.post(
                f"{base_url}{path}", content=broken, headers=headers | {"X-API-Key": INGEST_KEY}
            )
            assert keyed.status_code == 422 and keyed.json()["detail"][0]["field"] == "body", keyed.text
        # review: a key without the route's scope sending another content type was told about the type
        unscoped = httpx.post(
            f"{base_url}{path}", content=body, headers={"X-API-Key": REVIEW_KEY, "content-type": "text/plain"}
        )
        assert unscoped.status_code == 403, (path, unscoped.text)
    unicode_key = {"X-API-Key": UNICODE_REVIEW_KEY.encode("utf-8")}
    assert httpx.get(f"{base_url}/v1/turns/{'0' * 32}/review", headers=unicode_key).status_code == 404


def test_a_request_is_authenticated_while_the_sync_routes_hold_every_thread(world) -> None:
    """Found in review: the key check and the body-type check were plain functions, run on the thread
    pool the sync routes share; while a database stall kept its 40 threads waiting, the stream,
    long-poll and chat routes (async) could not even tell a caller it had no key."""
    import threading
    import uuid

    from fastapi.testclient import TestClient

    from api.main import create_app

    app = create_app()
    release, inside = threading.Event(), threading.Semaphore(0)

    @app.get("/v1/holds-a-thread-for-the-test")
    def holds() -> None:
        inside.release()
        release.wait(30)

    with TestClient(app, raise_server_exceptions=False) as client:  # one loop, its thread pool of 40
        holders = [
            threading.Thread(target=client.get, args=("/v1/holds-a-thread-for-the-test",)) for _ in range(40)
        ]
        try:
            for thread in holders:
                thread.start()
            for _ in range(40):
                assert inside.acquire(timeout=30)
            started = time.monotonic()
            answer = client.get(f"/v1/turns/{uuid.uuid4()}/stream")  # async, behind the key check
            took = time.monotonic() - started
        finally:
            release.set()
            for thread in holders:
                thread.join(30)
    assert answer.status_code == 401 and took < 5, (answer.status_code, took)


def test_a_named_metrics_folder_is_emptied_for_one_process_too(world, monkeypatch, tmp_path) -> None:
    """Observability review: only `--workers N` emptied PROMETHEUS_MULTIPROC_DIR of an earlier run's
    files; with one process they were summed in (a gauge of a dead process under a reused pid read
    back as this one's)."""
    import os
    import subprocess
    import sys

    import uvicorn

    from scripts.cli import main as cli

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale, own = tmp_path / f"gauge_livesum_{dead.pid}.db", tmp_path / f"counter_{os.getpid()}.db"
        # review: another `mlchat api` given the same folder keeps its files
        beside, kept = tmp_path / f"counter_{live.pid}.db", tmp_path / "notes.txt"
        for path in (stale, own, beside):
            path.write_bytes(b"old")
        kept.write_text("an operator's")
        started: list[object] = []
        monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append(a))
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        assert cli(["api"]) == 0
        assert started and not stale.exists() and beside.exists() and kept.exists()
        assert not own.exists() or own.read_bytes() != b"old"  # this process may write its own anew
    finally:
        live.kill()
        live.wait(timeout=60)
