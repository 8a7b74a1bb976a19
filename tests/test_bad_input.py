"""The bad-input catalogue: every door (HTTP, the Python API, run files, cards, the CLI) answers a bad
input with a 4xx, or a one-line error, that names the field (and the item or line); nothing of a
refused request is stored, and no input produces a 500 or a traceback.

Each HTTP case is one row: what is sent, the status, and a text the answer must contain.
"""

import hashlib
import json
import os
import time
import zlib
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from db.models import Character, Turn
from db.session import session_scope
from roleplay.png_text import SIGNATURE, _chunk, placeholder
from services.producer import TurnRejected, enqueue_turns, submit_turns
from tests.conftest import HASHED_INGEST_KEY, INGEST_KEY, new_conversation

ADMIN = {"X-API-Key": "test-key-1-abcdefgh"}
JSON = {"content-type": "application/json"}


def _turns() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Turn))


def _characters() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Character))


def _turn(**fields) -> dict:  # type: ignore[no-untyped-def]
    return new_conversation() | {"message": "Hello."} | fields


def _raw(obj: dict) -> bytes:
    """JSON text as a client could send it: lone surrogates as their escapes."""
    return json.dumps(obj).encode()


def _png_with(kind: bytes, keyword: bytes, body: bytes) -> bytes:
    image = placeholder()
    iend = image.rindex(b"IEND") - 4
    return image[:iend] + _chunk(kind, keyword + b"\x00" + body) + image[iend:]


CARD = json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Bomb"}}).encode()

# (case, method, path, body, extra headers, status, text the answer names)
HTTP_CASES = [
    (
        "lone surrogate in message",
        "post",
        "/v1/turns",
        _raw(_turn(message="hi \udcff")),
        JSON,
        422,
        "message",
    ),
    (
        "lone surrogate in player_name",
        "post",
        "/v1/turns",
        _raw(_turn(player_name="R\ud800")),
        JSON,
        422,
        "player_name",
    ),
    ("story_time beyond int4", "post", "/v1/turns", _raw(_turn(story_time=2**40)), JSON, 422, "story_time"),
    (
        "NUL in player_name",
        "post",
        "/v1/turns",
        _raw(_turn(player_name="Ro\x00wan")),
        JSON,
        422,
        "player_name",
    ),
    (
        "NUL in conversation",
        "post",
        "/v1/turns",
        _raw(_turn(conversation="a\x00b")),
        JSON,
        422,
        "conversation",
    ),
    ("NUL in story", "post", "/v1/turns", _raw(_turn(story="ash\x00fall")), JSON, 422, "story"),
    (
        "control character in message",
        "post",
        "/v1/turns",
        _raw(_turn(message="hi\x07")),
        JSON,
        422,
        "message",
    ),
    ("empty conversation", "post", "/v1/turns", _raw(_turn(conversation="")), JSON, 422, "conversation"),
    ("character slug over 64", "post", "/v1/turns", _raw(_turn(character="x" * 65)), JSON, 422, "character"),
    ("unknown speaker", "post", "/v1/turns", _raw(_turn(speaker="god")), JSON, 422, "speaker"),
    ("negative seed", "post", "/v1/turns", _raw(_turn(params={"seed": -1})), JSON, 422, "params.seed"),
    (
        "nine stop strings",
        "post",
        "/v1/turns",
        _raw(_turn(params={"stop": ["x"] * 9})),
        JSON,
        422,
        "params.stop",
    ),
    (
        "empty stop string",
        "post",
        "/v1/turns",
        _raw(_turn(params={"stop": [""]})),
        JSON,
        422,
        "params.stop[0]",
    ),
    ("a role smuggled in", "post", "/v1/turns", _raw(_turn(role="system")), JSON, 422, "role"),
    ("not JSON", "post", "/v1/turns", b'{"conversation": ', JSON, 422, "JSON"),
    ("a JSON array", "post", "/v1/turns", b"[1, 2]", JSON, 422, "body"),
    (
        "form-encoded body",
        "post",
        "/v1/turns",
        b"message=hi",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "application/x-www-form-urlencoded",
    ),
    (
        "text/plain body",
        "post",
        "/v1/turns",
        _raw(_turn()),
        {"content-type": "text/plain"},
        415,
        "text/plain",
    ),
    (
        "over-long Idempotency-Key",
        "post",
        "/v1/turns",
        _raw(_turn()),
        JSON | {"Idempotency-Key": "k" * 201},
        422,
        "idempotency-key",
    ),
    ("empty batch", "post", "/v1/turns:batch", _raw({"turns": []}), JSON, 422, "turns"),
    (
        "1001 turns in a batch",
        "post",
        "/v1/turns:batch",
        _raw({"turns": [{"conversation": "c", "message": "m"}] * 1001}),
        JSON,
        422,
        "turns",
    ),
    (
        "batch of form data",
        "post",
        "/v1/turns:batch",
        b"turns=1",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "content-type",
    ),
    ("a turn id that is not a UUID", "get", "/v1/turns/not-a-uuid", None, {}, 422, "turn_id (path)"),
    ("story event with no text", "post", "/v1/stories/ashfall/events", _raw({"text": ""}), JSON, 422, "text"),
    (
        "story event time beyond int4",
        "post",
        "/v1/stories/ashfall/events",
        _raw({"text": "x", "time": -(2**40)}),
        JSON,
        422,
        "time",
    ),
    (
        "NUL in a story event's scene",
        "post",
        "/v1/stories/ashfall/events",
        _raw({"text": "x", "scene": "a\x00"}),
        JSON,
        422,
        "scene",
    ),
    (
        "story name over 100",
        "post",
        "/v1/stories/" + "s" * 101 + "/events",
        _raw({"text": "x"}),
        JSON,
        422,
        "story (path)",
    ),
    (
        "unknown field in a story event",
        "post",
        "/v1/stories/ashfall/events",
        _raw({"text": "x", "role": "system"}),
        JSON,
        422,
        "role",
    ),
    ("a card that is not a card", "post", "/v1/characters:import", b"\x00\x01garbage", {}, 422, "not JSON"),
    (
        "a card with a bad slug",
        "post",
        "/v1/characters:import?slug=Bad%20Slug",
        CARD,
        {},
        422,
        "slug (query)",
    ),
    ("a truncated PNG card", "post", "/v1/characters:import", placeholder()[:30], {}, 422, "truncated PNG"),
    (
        "a PNG card that is a decompression bomb",
        "post",
        "/v1/characters:import",
        _png_with(b"zTXt", b"chara", b"\x00" + zlib.compress(b"A" * 30_000_000)),
        {},
        422,
        "decompression bomb",
    ),
    (
        "a PNG card with an oversized text chunk",
        "post",
        "/v1/characters:import",
        _png_with(b"tEXt", b"chara", b"A" * 2_100_000),
        {},
        422,
        "the limit is",
    ),
    (
        "a PNG card whose chunk is not base64",
        "post",
        "/v1/characters:import",
        _png_with(b"tEXt", b"chara", b"not base64!"),
        {},
        422,
        "not base64",
    ),
    (
        "a PNG with a corrupt CRC",
        "post",
        "/v1/characters:import",
        SIGNATURE + b"\x00\x00\x00\x00IEND\x00\x00\x00\x00",
        {},
        422,
        "CRC",
    ),
    (
        "export of an unknown character",
        "get",
        "/v1/characters/nobody-here/card",
        None,
        {},
        404,
        "unknown character",
    ),
    (
        "export in an unknown format",
        "get",
        "/v1/characters/elara/card?format=gif",
        None,
        {},
        422,
        "format (query)",
    ),
    (
        "export with a slug that is not a slug",
        "get",
        "/v1/characters/Bad_Slug/card",
        None,
        {},
        422,
        "slug (path)",
    ),
    # found in review: the field was "[1]" (the parser's position) and the parser's reason was lost
    (
        "a batch body that is not JSON",
        "post",
        "/v1/batches",
        b"{nope",
        JSON,
        400,  # a route of OpenAI's API: its error shape, and 400 for a body that does not validate
        '"message":"body: not valid JSON (Expecting property name enclosed in double quotes',
    ),
    # found in review: an admin could append to an inline request's content-named story
    (
        "a story event for a story name kept for inline requests",
        "post",
        "/v1/stories/inline-0123abcd/events",
        b'{"text": "The gate fell."}',
        JSON,
        422,
        '"field":"story (path)","msg":"\'inline-0123abcd\' starts with \'inline-\'',
    ),
    # review: an integer past Python's 4,300 digits was FastAPI's bare 400 too
    (
        "a body holding an integer of 4,301 digits",
        "post",
        "/v1/turns",
        b'{"conversation": "c", "character": "elara", "message": "hi", "n": ' + b"9" * 4301 + b"}",
        JSON,
        422,
        '"field":"body","msg":"not JSON that can be read (Exceeds the limit (4300 digits)',
    ),
    # review: a body nested past the parser's depth was FastAPI's bare 400 as well
    (
        "a body nested too deeply",
        "post",
        "/v1/turns",
        b"[" * 100_000,
        JSON,
        422,
        '"field":"body","msg":"not JSON that can be read (nested too deeply)',
    ),
    # found in review: a body that is not UTF-8 was FastAPI's bare 400, naming no field
    (
        "a story event body that is not UTF-8",
        "post",
        "/v1/stories/s-utf8/events",
        b'{"text": "caf\xe9"}',
        JSON,
        422,
        '"field":"body","msg":"not valid UTF-8 (byte 13 of the body)"',
    ),
    (
        "a batch with an unknown field",
        "post",
        "/v1/batches",
        b'{"input_file_id": "f", "endpoint": "/v1/chat/completions", "colour": 1}',
        JSON,
        400,
        '"param":"colour"',
    ),
    ("a batch without its file", "post", "/v1/batches", b'{"endpoint": "e"}', JSON, 400, "input_file_id"),
    ("a page of no batches", "get", "/v1/batches?limit=0", None, {}, 400, "limit (query)"),
    (
        "a batch whose file id holds a NUL",
        "post",
        "/v1/batches",
        b'{"input_file_id": "file-\\u0000", "endpoint": "/v1/chat/completions"}',
        JSON,
        400,
        "input_file_id",
    ),
    (
        "a batch whose metadata holds a NUL",
        "post",
        "/v1/batches",
        b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"k": "a\\u0000"}}',
        JSON,
        400,
        "metadata.k: contains a NUL",
    ),
    ("a batch id with a NUL", "get", "/v1/batches/batch%00x", None, {}, 400, "batch_id (path)"),
    ("a file id with a NUL", "get", "/v1/files/file%00x/content", None, {}, 400, "file_id (path)"),
    ("a page after an unknown batch", "get", "/v1/batches?after=batch_nope", None, {}, 400, "after"),
    ("cancelling an unknown batch", "post", "/v1/batches/batch_nope/cancel", None, {}, 404, "no batch"),
    (
        "an upload with no multipart boundary",
        "post",
        "/v1/files",
        b"x",
        {"content-type": "multipart/form-data"},
        400,
        "boundary",
    ),
    (
        "an upload without its file",
        "post",
        "/v1/files",
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b--\r\n',
        {"content-type": "multipart/form-data; boundary=b"},
        400,
        "file: missing",
    ),
]


@pytest.mark.parametrize(
    "case, method, path, body, headers, status, names", HTTP_CASES, ids=[c[0] for c in HTTP_CASES]
)
def test_a_bad_http_request_is_a_4xx_that_names_the_field(
    base_url, case, method, path, body, headers, status, names
) -> None:  # type: ignore[no-untyped-def]
    turns, characters = _turns(), _characters()
    r = httpx.request(method, base_url + path, content=body, headers=ADMIN | headers, timeout=60)
    assert r.status_code == status, r.text
    assert names in r.text, r.text
    assert _turns() == turns and _characters() == characters  # nothing of it was stored


def test_a_body_over_the_limit_is_413_however_it_is_sent(base_url) -> None:
    big = b'{"message": "' + b"x" * 1_100_000 + b'"}'

    def chunked():  # type: ignore[no-untyped-def]
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    turns = _turns()
    declared = httpx.post(f"{base_url}/v1/turns", content=big, headers=ADMIN | JSON)
    streamed = httpx.post(f"{base_url}/v1/turns", content=chunked(), headers=ADMIN | JSON)
    assert "content-length" not in streamed.request.headers  # really sent chunked
    assert declared.status_code == streamed.status_code == 413 and "over 1000000 bytes" in streamed.text
    card = httpx.post(f"{base_url}/v1/characters:import", content=b"x" * 8_100_000, headers=ADMIN)
    assert card.status_code == 413 and _turns() == turns


def test_a_batch_file_over_the_limit_is_413_and_nothing_is_kept(base_url, monkeypatch) -> None:
    from core.settings import settings

    monkeypatch.setattr(settings, "batch_file_max_bytes", 2048)
    before = sorted(settings.batch_files_dir.glob("*")) if settings.batch_files_dir.exists() else []
    files = {"file": ("big.jsonl", b"x" * 4096)}
    r = httpx.post(f"{base_url}/v1/files", files=files, data={"purpose": "batch"}, headers=ADMIN)
    assert r.status_code == 413 and "file: over 2048 bytes" in r.text
    assert (sorted(settings.batch_files_dir.glob("*")) if settings.batch_files_dir.exists() else []) == before


def test_every_bad_item_of_a_batch_is_listed_by_its_index(base_url) -> None:
    turns = _turns()
    shape = httpx.post(
        f"{base_url}/v1/turns:batch",
        json={"turns": [_turn(), _turn(message=""), _turn(), _turn(params={"temperature": 9})]},
        headers=ADMIN,
    )
    assert shape.status_code == 422
    fields = [e["field"] for e in shape.json()["detail"]]
    assert fields == ["turns[1].message", "turns[3].params.temperature"]
    meaning = httpx.post(
        f"{base_url}/v1/turns:batch",
        json={"turns": [_turn(character="nobody"), _turn(), _turn(model="gpt-oss-20b")]},
        headers=ADMIN,
    )
    assert meaning.status_code == 422
    assert [e["field"] for e in meaning.json()["detail"]] == ["turns[2].model"]  # models are checked first
    # review of error texts (stop 79): the served models were a Python list
    assert meaning.json()["detail"][0]["msg"].endswith("this deployment serves smollm2-135m")
    conversations = httpx.post(
        f"{base_url}/v1/turns:batch",
        json={"turns": [_turn(character="nobody"), _turn(), _turn(character="ghost")]},
        headers=ADMIN,
    )
    assert [e["field"] for e in conversations.json()["detail"]] == [
        "turns[0].character",
        "turns[2].character",
    ]
    assert "unknown character 'ghost'" in conversations.json()["message"]
    # review of error texts (stop 79): a nested check's place was said twice,
    # "params.response_format: response_format.regex: Field required"
    nested = httpx.post(
        f"{base_url}/v1/turns:batch",
        json={"turns": [_turn(params={"response_format": {"type": "regex"}})]},
        headers=ADMIN,
    )
    assert nested.status_code == 422
    (error,) = nested.json()["detail"]
    assert (error["field"], error["msg"]) == ("turns[0].params.response_format.regex", "Field required")
    assert nested.json()["message"] == "turns[0].params.response_format.regex: Field required"
    from core.validation import placed  # a place that holds ": " (a property's name) is kept whole

    quoted = "response_format.json_schema.schema.properties['a: b']: Field required"
    assert placed("params.response_format", quoted) == (
        "params.response_format.json_schema.schema.properties['a: b']",
        "Field required",
    )
    bracketed = "response_format.json_schema.schema.properties['x[']: Field required"  # read through quotes
    assert placed("params.response_format", bracketed)[1] == "Field required"
    assert _turns() == turns  # all or none


@pytest.mark.parametrize("key", ["", "wrong", "clé-non-ascii-é", "x" * 5000])
def test_a_bad_api_key_is_a_401_never_an_error(base_url, key) -> None:
    raw = httpx.post(
        f"{base_url}/v1/turns",
        content=_raw(_turn()),
        headers=[("X-API-Key", key.encode("utf-8")), ("content-type", "application/json")],
    )
    assert raw.status_code == 401 and "invalid API key" in raw.text


def test_an_ingest_key_reads_only_its_own_turns_and_never_a_prompt(base_url) -> None:
    mine = {"X-API-Key": INGEST_KEY}
    other = {"Authorization": f"Bearer {HASHED_INGEST_KEY}"}  # configured by its sha256 only
    created = httpx.post(f"{base_url}/v1/turns", json=_turn(), headers=mine)
    assert created.status_code == 202
    turn_id = created.json()["id"]
    own = httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=mine)
    assert own.status_code == 200 and own.json()["prompt"] is None and own.json()["context"] is None
    assert httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=other).status_code == 404
    assert httpx.delete(f"{base_url}/v1/turns/{turn_id}", headers=other).status_code == 404
    assert httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=ADMIN).status_code == 200
    assert httpx.get(f"{base_url}/v1/turns/{turn_id}/manifest", headers=mine).status_code == 403
    refused = httpx.post(f"{base_url}/v1/characters:import", content=CARD, headers=mine)
    assert refused.status_code == 403 and "admin" in refused.text
    assert (
        httpx.post(f"{base_url}/v1/stories/ashfall/events", json={"text": "x"}, headers=other).status_code
        == 403
    )
    with session_scope() as s:
        assert s.get(Turn, turn_id).api_key == "game-a"
    # tenant review: the size of the worker's batch counts other tenants' turns; a tenant's own view,
    # callback and export lines leave it out, an operator's keeps it
    with session_scope() as s:
        turn = s.get_one(Turn, turn_id)
        turn.timings, turn.reply = {"batch_size": 7, "total_ms": 12.5}, "Well met."
    own = httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=mine).json()
    assert own["timings"] == {"total_ms": 12.5}
    assert httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=ADMIN).json()["timings"]["batch_size"] == 7
    from services.runs import export

    with session_scope() as s:
        turn = s.get_one(Turn, turn_id)
        run = SimpleNamespace(created_at=turn.created_at, model=turn.model)
        for line in (export._native_ok(turn, run), export._openai_ok(turn, run)):  # type: ignore[arg-type]
            assert "batch_size" not in json.dumps(line), line


def test_health_names_the_dependency_that_is_down_and_nothing_else(base_url, monkeypatch) -> None:
    from api.routes import health

    monkeypatch.setattr(health, "_broker_state", lambda: "down")
    r = httpx.get(f"{base_url}/healthz")
    assert r.status_code == 503 and r.json() == {
        "status": "unhealthy",
        "database": "ok",
        "schema": "ok",
        "broker": "down",
    }


def test_health_answers_within_its_deadline_while_the_broker_hangs(base_url, monkeypatch) -> None:
    """Review (stop 75): a broker that took connections and never answered held /healthz for its
    socket timeout twice over (a minute), the probes' checks queued one behind another on two
    threads, and no probe ever got its 503. Each check now has a deadline, and probes arriving while
    one hangs join it rather than queue."""
    import socket
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from api.routes import health
    from tasks import queues

    monkeypatch.setattr(health, "CHECK_DEADLINE_S", 1.0)
    with socket.socket() as hangs:
        hangs.bind(("127.0.0.1", 0))
        hangs.listen(64)
        url = f"redis://127.0.0.1:{hangs.getsockname()[1]}/0"
        monkeypatch.setattr(queues, "probe_connection", partial(queues.probe_connection, url))
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: httpx.get(f"{base_url}/healthz", timeout=20), range(4)))
        took = time.monotonic() - started
        broker_check = health._running["broker"]
        assert all(a.status_code == 503 and a.json()["broker"] == "down" for a in answers), [
            a.text for a in answers
        ]
        assert all(a.json()["database"] == "ok" for a in answers)
        assert took < 2 * queues.PROBE_TIMEOUT_S, took  # the deadline, not the broker's 30 s socket timeout
    broker_check.result(timeout=3 * queues.PROBE_TIMEOUT_S)  # it ends: the next probe starts afresh
    monkeypatch.undo()
    assert httpx.get(f"{base_url}/healthz").status_code == 200


def test_health_says_a_read_only_database_or_broker_takes_no_traffic(base_url, monkeypatch, tmp_path) -> None:
    """Review (stop 75): a standby, or a primary a failover demoted that the name still points at,
    answers SELECT 1 and refuses every write; a Redis replica answers PING and refuses every publish.
    /healthz said ok to both."""
    from functools import partial

    from db.session import get_probe_engine
    from tasks import queues
    from tests.conftest import a_redis_of_its_own

    probe = get_probe_engine()
    real_connect = probe.connect

    def read_only() -> Any:  # this probe's session reads only, as a standby's does
        conn = real_connect()
        conn.exec_driver_sql("SET SESSION default_transaction_read_only = on")
        conn.commit()
        return conn

    monkeypatch.setattr(probe, "connect", read_only)
    r = httpx.get(f"{base_url}/healthz")
    assert r.status_code == 503 and r.json()["database"] == "read-only" and r.json()["broker"] == "ok", r.text
    monkeypatch.undo()

    with a_redis_of_its_own(tmp_path) as replica:  # made a replica (of a master it never reaches)
        replica.execute_command("REPLICAOF", "127.0.0.1", "1")
        url = f"redis://127.0.0.1:{replica.connection_pool.connection_kwargs['port']}/0"
        monkeypatch.setattr(queues, "probe_connection", partial(queues.probe_connection, url))
        r = httpx.get(f"{base_url}/healthz")
        assert r.status_code == 503 and r.json()["broker"] == "read-only" and r.json()["database"] == "ok", (
            r.text
        )
        # Review: a Redis at its maxmemory under noeviction (README's advice) answers PING and ROLE
        # and refuses every write: /healthz said ok while every enqueue failed.
        replica.execute_command("REPLICAOF", "NO", "ONE")
        replica.config_set("maxmemory-policy", "noeviction")
        replica.config_set("maxmemory", 1)
        r = httpx.get(f"{base_url}/healthz")
        assert r.status_code == 503 and r.json()["broker"] == "full", r.text
    monkeypatch.undo()
    # review: a managed replica that refuses ROLE was taken for a primary, its write's refusal "down"
    with a_redis_of_its_own(tmp_path, "--rename-command", "ROLE", "") as managed:
        managed.execute_command("REPLICAOF", "127.0.0.1", "1")
        url = f"redis://127.0.0.1:{managed.connection_pool.connection_kwargs['port']}/0"
        monkeypatch.setattr(queues, "probe_connection", partial(queues.probe_connection, url))
        r = httpx.get(f"{base_url}/healthz")
        assert r.status_code == 503 and r.json()["broker"] == "read-only", r.text
    monkeypatch.undo()
    # review of that: an ACL user kept to the service's keys may not write the probe's key: it answers
    with a_redis_of_its_own(tmp_path) as kept:
        kept.execute_command("ACL", "SETUSER", "mlchat", "on", ">pw", "~_kombu*", "~unacked*", "+@all")
        url = f"redis://mlchat:pw@127.0.0.1:{kept.connection_pool.connection_kwargs['port']}/0"
        monkeypatch.setattr(queues, "probe_connection", partial(queues.probe_connection, url))
        r = httpx.get(f"{base_url}/healthz")
        assert r.status_code == 200 and r.json()["broker"] == "ok", r.text
    monkeypatch.undo()
    assert httpx.get(f"{base_url}/healthz").status_code == 200


def test_health_answers_while_slow_work_holds_every_pooled_connection(base_url) -> None:
    """Found in review: /healthz took its connection from the request pool, so a replica whose pool
    slow requests held answered its liveness probe only after the pool's 30 s timeout: the probe
    timed out and a replica that was only busy was restarted."""
    from db.session import get_engine

    engine = get_engine()
    held = []
    try:
        while len(held) < engine.pool.size() + engine.pool._max_overflow:  # type: ignore[attr-defined]
            held.append(engine.connect())
        r = httpx.get(f"{base_url}/healthz", timeout=10)
    finally:
        for conn in held:
            conn.close()
    assert r.status_code == 200 and r.json()["database"] == "ok"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"conversation": "a\x00b"}, "conversation"),
        ({"story_time": 2**31}, "story_time"),
        ({"player_name": "\ud800"}, "player_name"),
        ({"idempotency_key": "k\x00"}, "idempotency_key"),
        ({"params": {"stop": ["ok", "\x00"]}}, "params.stop.1"),
    ],
)
def test_the_python_api_names_the_field(world, change, field) -> None:
    turns = _turns()
    with pytest.raises(ValidationError) as caught:
        enqueue_turns([_turn(**change)], send=False)
    assert ".".join(str(p) for p in caught.value.errors()[0]["loc"]) == field
    assert _turns() == turns


def test_the_python_api_lists_every_item_that_names_nothing(world) -> None:
    with pytest.raises(TurnRejected) as caught:
        submit_turns(
            [
                _turn(),
                _turn(character="nobody"),
                {"conversation": "ghost-" + _turn()["conversation"], "message": "Hi"},
            ],
            send=False,
        )
    assert [(e.index, e.field) for e in caught.value.errors] == [(1, "character"), (2, "conversation")]


def test_run_lines_name_the_line_and_the_byte(world, tmp_path) -> None:
    from services.runs import RunValidationError, submit_run

    path = tmp_path / "run.jsonl"
    good = json.dumps({"custom_id": "a", "character": "elara", "message": "Hi"}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"custom_id": "b", "message": "caf\xe9"}\n')
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="bytes-" + tmp_path.name)
    ((error),) = caught.value.errors
    assert (
        error.line == 2 and "not valid UTF-8 (byte 34 of the line" in error.reason
    )  # the BOM on line 1 was fine


def test_a_run_line_too_long_to_be_a_request_is_named_bad_unread(world, tmp_path, monkeypatch) -> None:
    """Found in review: a line was read and parsed whole, several times (its format, its validation,
    its storing), so one line of 200 MB (a junk field no request needs) held the API process's
    memory and its GIL for seconds a parse, four such batches at once enough to get it killed. A
    line longer than MLCHAT_RUN_LINE_MAX_BYTES is named bad, never read whole; the lines around it
    (one exactly at the bound, CRLF or not, and the last with no line end) are read as ever."""
    from core.settings import settings
    from services.runs import RunValidationError, submit_run
    from services.runs.validate import iter_lines

    def line(custom_id: str, size: int) -> bytes:  # a request of `size` bytes, its message padded
        empty = len(json.dumps({"custom_id": custom_id, "character": "elara", "message": ""}))
        return json.dumps(
            {"custom_id": custom_id, "character": "elara", "message": "y" * (size - empty)}
        ).encode()

    limit = 2048  # a message's own bound is 4,000 characters
    monkeypatch.setattr(settings, "run_line_max_bytes", limit)
    path = tmp_path / "run.jsonl"
    long = line("long", 3 * (1 << 20))  # past the bound and past readline's chunk, read past whole
    path.write_bytes(
        line("a", limit) + b"\r\n" + long + b"\n" + line("b", limit + 1) + b"\n" + line("c", limit)
    )
    read = list(iter_lines(path))
    assert [n for n, text in read if isinstance(text, str)] == [1, 4]
    assert [n for n, text in read if not isinstance(text, str)] == [2, 3]
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="long-" + tmp_path.name)
    assert [(e.line, e.reason) for e in caught.value.errors] == [
        (n, "longer than MLCHAT_RUN_LINE_MAX_BYTES (2,048 bytes); not read") for n in (2, 3)
    ]


def test_cli_outputs_a_script_reads_are_json_and_a_missing_manifest_is_said(world, capsys) -> None:
    """CLI review: `story-event` printed a Python dict, `seed` a dataclass's repr, and `manifest
    --json` printed `null` with exit code 0 for a turn with no manifest (not run yet, or forgotten),
    which a script could not tell from a manifest."""
    import json
    import uuid

    from scripts.cli import main as cli
    from services.producer import enqueue_turns

    capsys.readouterr()
    story = f"json-{uuid.uuid4().hex[:8]}"
    assert cli(["story-event", story, "The gate fell."]) == 0
    event = json.loads(capsys.readouterr().out)
    assert (event["story"], event["ordinal"]) == (story, 1) and isinstance(event["id"], int)
    assert cli(["seed"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {
        "characters", "story_events", "conversations", "history_lines_added"
    }  # fmt: skip
    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Not run yet."}], send=False)
    assert cli(["manifest", str(turn_id), "--json"]) == 1
    said = capsys.readouterr()
    assert said.out == "" and f"turn {turn_id} has no manifest yet (status queued)" in said.err


def test_cli_errors_are_one_line_with_a_non_zero_exit(world, tmp_path, capsys) -> None:
    from scripts.cli import main as cli

    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"spec": "chara_card_v9"}')
    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps({"custom_id": "a", "character": "elara", "message": "hi"}) + "\n")
    empty_set = tmp_path / "empty-set"
    empty_set.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (empty_set / name).write_text("")
    cases = [
        (["card", "import", str(bad)], 2, "unsupported card spec"),
        (
            ["card", "export", "nobody-here", "--out", str(tmp_path / "x.json")],
            2,  # carried since stop 60: a name that finds nothing exited 1, as an outage does
            "unknown character 'nobody-here'",
        ),
        (["run", "status", "no-such-run"], 2, "no run 'no-such-run'"),
        (["run", "cancel", "no-such-run"], 2, "no run 'no-such-run'"),
        (["lora", "dataset", "elara", "--run", "no-such-run", "--out", str(tmp_path / "ds")], 2, "no run"),
        (["lora", "dataset", "nobody-here", "--out", str(tmp_path / "ds2")], 2, "no character 'nobody-here'"),
        (["manifest", "not-a-uuid"], 2, "is not a UUID"),
        (["run", "submit", str(tmp_path / "missing.jsonl")], 2, "does not exist"),
        (["chat", "--character", "elara", "--message", "hi", "--params", "{nope", "--inline"], 2, "--params"),
        # carried since stop 68: taken and never applied (the inline turn ran to its end)
        (["chat", "--character", "elara", "--message", "hi", "--inline", "--timeout", "5"], 2, "--timeout"),
        # review: a story name kept for inline requests is a refusal (2), not an outage (1)
        (["story-event", "inline-0123abcd", "The gate fell."], 2, "kept for inline requests"),
        # found in review: a refused turn exited 1, as an outage does
        (["chat", "--character", "nobody-here", "--message", "hi"], 2, "unknown character"),
        # CLI review: these refusals exited 1, as an outage does
        (["manifest", "00000000-0000-0000-0000-000000000000"], 2, "turn id: no turn"),
        (["facts", "move", "p-nobody", "999999999", "--scope", "world"], 2, "999999999"),
        (["run", "submit", str(lines), "--name", "bad:name"], 2, "must not hold ':'"),
        (["run", "submit", str(lines), "--name", ""], 2, "run name: must not be empty"),  # not the stem
        (["migrate", "--down"], 2, "name the revision to go down to"),  # was a silent no-op
        (
            ["lora", "train", str(empty_set), "--out", str(tmp_path / "a2"), "--target-modules", ","],
            2,
            "names no module",
        ),
        (["run", "export", "no-such-run", "--format", "openai", "--alternatives"], 2, "native lines only"),
        (["run", "submit", str(lines), "--character", "nobody-here"], 2, "unknown character 'nobody-here'"),
        (["lora", "train", str(empty_set), "--out", str(tmp_path / "adapter")], 2, "no examples"),
        # numbers review: an option with a lower bound alone took infinity (the sweep's interval then
        # failed every sweep naming nothing), and a number past a bigint was PostgreSQL's one line
        (["sweep", "--older-than", "inf"], 2, "--older-than"),
        (["chat", "--character", "elara", "--message", "hi", "--timeout", "inf"], 2, "--timeout"),
        (["run", "list", "--limit", "9223372036854775808"], 2, "--limit"),
        (["facts", "move", "p-nobody", "9223372036854775808", "--scope", "world"], 2, "fact_id"),
    ]
    # review of error texts (stop 79): pydantic's "Value error, " reached the one line
    cases += [
        (["chat", "--character", "elara", "--message", " "], 2, "message: message is empty"),
        (["story-event", "some-story", " "], 2, "text: text is empty"),
    ]
    for argv, code, names in cases:
        assert cli(argv) == code, argv
        err = capsys.readouterr().err
        assert names in err and "Traceback" not in err and "Value error" not in err, (argv, err)
        # review of error texts (stop 79): `chat` sends one request, and its refusal said "item 0:"
        assert argv[0] != "chat" or "item 0" not in err, (argv, err)
    # CLI review: an export naming no run made its output folder first
    for command in ("export", "scenes"):
        assert cli(["run", command, "no-such-run", "--out", str(tmp_path / f"never-{command}")]) == 2
        assert not (tmp_path / f"never-{command}").exists()


def test_a_cli_file_that_never_ends_or_is_too_long_is_one_line_naming_the_file(
    world, tmp_path, capsys, monkeypatch
) -> None:
    """Found in review: a file read whole (a chat log to import, an inline request's persona) had no
    bound: /dev/zero or a log of gigabytes ended in a MemoryError traceback or the OOM killer; a run
    file that is a device was copied until the temporary folder filled, or hashed for ever by a
    resume."""
    from core.settings import settings
    from db.runs import create_run
    from scripts.cli import main as cli

    monkeypatch.setattr(settings, "history_max_bytes", 2048)
    with session_scope() as s:  # a run whose submission a resume would go on with (its digest read first)
        create_run(session=s, name=f"resume-{tmp_path.name}", model="m", file_hash="0" * 64, total=1)
    fifo = tmp_path / "lines.jsonl"
    os.mkfifo(fifo)
    long_log = tmp_path / "long.jsonl"
    long_log.write_text(json.dumps({"name": "Rowan", "is_user": True, "mes": "x" * 3000}) + "\n")
    persona = tmp_path / "persona.json"
    persona.write_text(json.dumps({"name": "Big", "description": "x" * (settings.api_max_body_bytes + 10)}))
    # review: each file was bounded alone, so a request of three files could be thrice the HTTP body
    half = tmp_path / "half-persona.json"
    half.write_text(json.dumps({"name": "Half", "description": "x" * (settings.api_max_body_bytes // 2)}))
    story = tmp_path / "half-story.json"
    story.write_text(json.dumps({"story": "x" * (settings.api_max_body_bytes // 2)}))
    history = ["history", "import", "--conversation", f"never-{tmp_path.name}", "--character", "elara"]
    cases = [
        ([*history, "/dev/zero"], "/dev/zero: longer than MLCHAT_HISTORY_MAX_BYTES"),
        ([*history, str(long_log)], "longer than MLCHAT_HISTORY_MAX_BYTES (2,048 bytes)"),
        (["chat", "--message", "hi", "--persona", str(persona)], "longer than MLCHAT_API_MAX_BODY_BYTES"),
        (
            ["chat", "--message", "hi", "--persona", str(half), "--story", str(story)],
            "half-story.json: longer with the request's other files than MLCHAT_API_MAX_BODY_BYTES",
        ),
        (["run", "submit", "/dev/zero", "--name", f"zero-{tmp_path.name}"], "/dev/zero: not a regular file"),
        # review: the private copy opened the file before checking it, and a pipe with no writer held
        # that open for ever
        (["run", "submit", str(fifo), "--name", f"fifo-{tmp_path.name}"], f"{fifo}: not a regular file"),
        (["run", "resume", f"resume-{tmp_path.name}", "/dev/zero"], "/dev/zero: not a regular file"),
        # CLI review: another file than the run's exited 1, as an outage does
        (["run", "resume", f"resume-{tmp_path.name}", str(long_log)], "is not the file run"),
    ]
    for argv, names in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert names in err and "Traceback" not in err and err.strip().count("\n") == 0, (argv, err)


def test_a_server_that_fails_to_start_or_stop_is_one_cli_line_not_a_traceback(monkeypatch, capsys) -> None:
    """Found in review: `pg_ctl` or `redis-server` failing (CalledProcessError, TimeoutExpired) and
    psycopg's own errors (the embedded server's set-up) escaped main() as tracebacks."""
    import subprocess

    import psycopg

    from core import embedded
    from scripts.cli import main as cli

    for failure in (
        subprocess.CalledProcessError(1, ["pg_ctl", "start"]),
        subprocess.TimeoutExpired(["pg_ctl", "start"], 300),
        psycopg.OperationalError("connection refused"),
    ):

        def fail(*args: object, failure: Exception = failure) -> str:
            raise failure

        monkeypatch.setattr(embedded, "start_postgres", fail)
        assert cli(["services", "start"]) == 1, failure
        err = capsys.readouterr().err
        assert err.startswith("mlchat: ") and err.count("\n") == 1, err


def test_slugs_never_collide_silently(world) -> None:
    from services.characters import import_card

    def card(name: str, description: str) -> bytes:
        return json.dumps(
            {"spec": "chara_card_v2", "data": {"name": name, "description": description}}
        ).encode()

    first = import_card(card("루피", "A pirate captain."))
    second = import_card(card("조로", "A swordsman."))  # no Latin letters either: not "character" twice
    again = import_card(card("루피", "A pirate captain, older."))  # the same character: an update
    twin = import_card(card("Mira!", "One."))
    other_twin = import_card(card("Mira?", "Two."))  # the same ASCII slug, another character
    assert first.slug != second.slug and first.slug.startswith("c-")
    assert again.slug == first.slug and not again.created and again.id == first.id
    assert other_twin.slug != twin.slug and other_twin.slug.startswith("mira-") and other_twin.created
    with session_scope() as s:
        names = dict(
            s.execute(
                select(Character.slug, Character.name).where(
                    Character.slug.in_([first.slug, second.slug, twin.slug, other_twin.slug])
                )
            )
            .tuples()
            .all()
        )
    assert names == {first.slug: "루피", second.slug: "조로", twin.slug: "Mira!", other_twin.slug: "Mira?"}


def test_a_key_configured_by_its_digest_is_known_by_the_key_and_not_by_the_digest() -> None:
    # found in review: this test compared the configured digest with the expression that made it
    from api.deps import key_caller
    from core.settings import settings

    hashed = [k for k in settings.api_keys if k.name == "game-b"][0]
    assert hashed.key is None  # configured by its digest alone
    found = key_caller(HASHED_INGEST_KEY)
    assert found is not None and found.key_id == hashed.id and found.tenant == hashed.tenant_id
    assert key_caller(hashlib.sha256(HASHED_INGEST_KEY.encode()).hexdigest()) is None  # the digest is no key
    assert key_caller(HASHED_INGEST_KEY + "x") is None


def test_the_story_event_command_names_the_field(world, capsys) -> None:
    from scripts.cli import main as cli

    assert cli(["story-event", "ashfall", "bad\x00text"]) == 2
    assert cli(["story-event", "ashfall", "fine", "--time", str(2**40)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("mlchat: text:") and "NUL" in err[0]
    assert err[1].startswith("mlchat: time:")


def test_a_data_folder_with_a_bad_file_is_refused_naming_file_item_and_field(world, tmp_path, capsys) -> None:
    """Found in review: `mlchat seed --data DIR` printed a traceback for a malformed file (a list
    of strings, a history line of three parts) and "mlchat: 'luffy'" for an unknown character."""
    import shutil

    from core.settings import PROJECT_ROOT
    from scripts.cli import main as cli

    cases = [
        ("characters.json", ["x"], "characters.json: item[0]: Input should be a valid dictionary"),
        ("story_events.json", [{"story": "s", "ordinal": "first", "text": "t"}], "item[0].ordinal"),
        (
            "conversations.json",
            [{"external_id": "c", "character": "elara", "history": [["user", "a", "b"]]}],
            "conversations.json: item[0].history[0]",
        ),
        (
            "conversations.json",
            [{"external_id": "c", "character": "nobody-here"}],
            "item[0].character: 'nobody-here' is not in characters.json",
        ),
        # review: a null for a NOT NULL column passed the check and failed the insert
        (
            "conversations.json",
            [{"external_id": "c", "character": "elara", "player_id": None}],
            "item[0].player_id",
        ),
    ]
    for i, (name, content, said) in enumerate(cases):
        data = tmp_path / f"data-{i}"
        shutil.copytree(PROJECT_ROOT / "data", data)
        (data / name).write_text(json.dumps(content), encoding="utf-8")
        assert cli(["seed", "--data", str(data)]) == 2, name
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and err.count("\n") == 1, err


def test_a_cli_failure_is_one_line_naming_the_setting_with_no_traceback_from_the_logs(world) -> None:
    """Found in a CLI review: the CLI's own error was one line, but the failure's warning logged with
    its traceback came before it (pytest's log handlers hide that in-process, so a real process runs
    it here), and an unreachable broker or database was told by host and port, not by the setting to
    look at."""
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    env = os.environ | {"REDIS_URL": "redis://127.0.0.1:1"}
    args = [
        "chat",
        "--character",
        "elara",
        "--message",
        "hi",
        "--conversation",
        f"cli-{uuid.uuid4().hex[:8]}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "scripts.cli", *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("mlchat: the broker is unreachable (REDIS_URL"), lines[-1]
    assert any("broker unreachable at enqueue (" in line for line in lines[:-1])  # the log, one line


def _sweep_steps_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's steps that are not the test's, left out: run for real they re-send and fail what
    the session's later tests left waiting (review; a clone's run saw re-sent memory jobs reach later
    files' queues). Each test puts its own step back."""
    import memory.schedule
    import services.batches
    import services.retention
    from services import sweeper

    monkeypatch.setattr(sweeper, "resend_stranded", lambda **_: {})
    monkeypatch.setattr(sweeper, "close_abandoned_runs", dict)
    monkeypatch.setattr(sweeper, "fail_unserved_live_turns", dict)
    monkeypatch.setattr(services.batches, "housekeeping", dict)
    monkeypatch.setattr(services.retention, "prune", dict)
    monkeypatch.setattr(memory.schedule, "reschedule_stalled", lambda: 0)


def test_a_sweep_that_cannot_reach_the_broker_names_the_setting(world, monkeypatch, capsys) -> None:
    """Review (stop 75): `mlchat sweep` said "Error 111 connecting to redis:6379" where every other
    command names REDIS_URL: each step's error was flattened to its text before it was looked at."""
    from kombu.exceptions import OperationalError

    from scripts.cli import main
    from services import sweeper

    def away(**kwargs: Any) -> Any:
        raise OperationalError("Error 111 connecting to redis:6379. Connection refused.")

    _sweep_steps_left_out(monkeypatch)
    monkeypatch.setattr(sweeper, "resend_stranded", away)
    assert main(["sweep"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "re-sending stranded turns: the broker is unreachable (REDIS_URL" in err, err


def test_a_sweep_against_a_schema_behind_its_code_says_so_in_one_line_and_does_nothing(world, capsys) -> None:
    """Review of a mixed-version fleet: a sweep on a host upgraded before `mlchat migrate` ran every
    step, each failing each minute on a column it lacked; it is refused first, as a worker is."""
    from sqlalchemy import text

    from db.migrate import code_head
    from db.session import session_scope
    from scripts.cli import main

    with session_scope() as s:
        s.execute(text("UPDATE alembic_version SET version_num = '0049'"))
    try:
        assert main(["sweep"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "at revision 0049" in err[0] and "run `mlchat migrate` first" in err[0], err
    finally:
        with session_scope() as s:
            s.execute(text("UPDATE alembic_version SET version_num = :head"), {"head": code_head()})


def test_a_sweep_whose_files_folder_cannot_be_written_says_so_naming_the_setting(
    world, monkeypatch, tmp_path, capsys
) -> None:
    """Review of error texts (stop 79): only the API checked MLCHAT_FILES_DIR at start; a sweeper (or
    a worker) that finalizes batches into a folder it cannot write said nothing, and batches failed
    a day later. The sweep names it as a failing step; its other steps run all the same."""
    from core.settings import settings
    from scripts.cli import main

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    monkeypatch.setattr(settings, "files_dir", blocked)
    assert main(["sweep"]) == 1
    err = capsys.readouterr().err
    assert "the batch files' folder" in err and f"MLCHAT_FILES_DIR: {blocked}" in err, err
    assert "Traceback" not in err


def test_a_sweep_steps_bug_shows_its_traceback_at_debug(world, monkeypatch, caplog) -> None:
    """Review (stop 76): a sweep step that raised was kept as its one line only; the README's
    MLCHAT_LOG_LEVEL=DEBUG showed no traceback, as nothing was logged."""
    import logging

    from scripts.cli import main
    from services import sweeper

    def broken() -> Any:
        raise TypeError("unsupported operand type(s) for -: 'NoneType' and 'int'")

    _sweep_steps_left_out(monkeypatch)
    monkeypatch.setattr(sweeper, "close_abandoned_runs", broken)
    with caplog.at_level(logging.DEBUG, logger="mlchat.sweep"):
        assert main(["sweep"]) == 1
    (record,) = [r for r in caplog.records if r.name == "mlchat.sweep"]
    assert "closing abandoned runs" in record.getMessage() and record.exc_info is not None
    assert isinstance(record.exc_info[1], TypeError)


def test_the_clis_one_line_logs_give_way_to_tracebacks_in_the_worker_and_api_it_starts() -> None:
    """Review of the CLI's one-line logs: `mlchat worker` and `mlchat api` run under the CLI's main(),
    whose handler was installed first, and their own set-up (basicConfig) did nothing: a failed flush
    in production logged one line, no traceback. The set-up now reconfigures its own handler."""
    import subprocess
    import sys
    from pathlib import Path

    snippet = (
        "import logging\n"
        "from core.logging import configure_logging\n"
        "configure_logging(tracebacks=False)\n"
        "try: 1 / 0\n"
        "except ZeroDivisionError: logging.getLogger('cli').exception('one line')\n"
        "configure_logging()\n"
        "try: 1 / 0\n"
        "except ZeroDivisionError: logging.getLogger('worker').exception('with its traceback')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=Path(__file__).resolve().parent.parent,
        env=os.environ | {"MLCHAT_LOG_LEVEL": "INFO"},  # DEBUG shows tracebacks in both
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    cli, worker = done.stderr.split("ERROR worker:")
    assert "one line (ZeroDivisionError: division by zero)" in cli and "Traceback" not in cli
    assert "Traceback (most recent call last)" in worker


def test_a_broken_off_requests_path_reaches_the_log_escaped(caplog) -> None:
    """Review (stop 76): a body broken off on a path holding escape sequences (a desk line's id,
    percent-encoded) logged the path raw, where a terminal reading the log obeys them."""
    import asyncio
    import logging

    from starlette.requests import ClientDisconnect, Request

    from api.errors import _client_gone

    path = "/desk/lines/\x1b[1A\x1b[2Kforged/pick"
    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": []}
    with caplog.at_level(logging.INFO, logger="api.errors"):
        asyncio.run(
            _client_gone(Request(scope | {"server": ("api", 80), "scheme": "http"}), ClientDisconnect())
        )
    (said,) = [r.getMessage() for r in caplog.records if r.name == "api.errors"]
    assert "\x1b" not in said and "\\x1b[2Kforged" in said, said
