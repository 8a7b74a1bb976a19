"""Each API key is its own tenant: conversations and idempotency keys are namespaced by the key's
tenant, over every door (a turn, a batch of turns, an HTTP batch file), and a conversation started
by one producer is never reassigned by another that raced it.

Keys from tests/conftest.py: `game-a` (INGEST_KEY) and `game-b` (HASHED_INGEST_KEY) are ingest keys
of two tenants.
"""

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from db.models import Conversation, Turn
from db.session import get_autocommit_engine, session_scope
from db.world import find_characters, upsert_conversations
from services.producer import TurnRejected, enqueue_turns
from tests.conftest import HASHED_INGEST_KEY, INGEST_KEY, new_conversation

A = {"X-API-Key": INGEST_KEY}
B = {"X-API-Key": HASHED_INGEST_KEY}
ADMIN = {"X-API-Key": "test-key-1-abcdefgh"}


def _turns_in(conversation_id: int) -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Turn).where(Turn.conversation_id == conversation_id))


def _post(base_url: str, headers: dict[str, str], body: dict, **extra: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/turns", headers=headers | extra, json=body)


def _conversation_of(base_url: str, headers: dict[str, str], turn_id: str) -> int:
    got = httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=headers)
    assert got.status_code == 200, got.text
    assert "conversation_id" not in got.json()  # the database's serial: an operator's alone
    with session_scope() as s:
        return int(s.scalar(select(Turn.conversation_id).where(Turn.id == uuid.UUID(turn_id))))


def test_a_key_cannot_append_to_another_keys_conversation(base_url) -> None:
    started = new_conversation()
    first = _post(base_url, A, started | {"message": "I am the blacksmith's daughter."})
    assert first.status_code == 202, first.text
    a_conv = _conversation_of(base_url, A, first.json()["id"])

    for path, body in (
        ("/v1/turns", {"conversation": started["conversation"], "message": "What did she tell you?"}),
        (
            "/v1/turns:batch",
            {"turns": [{"conversation": started["conversation"], "message": "What did she tell you?"}]},
        ),
    ):
        refused = httpx.post(f"{base_url}{path}", headers=B, json=body)
        assert refused.status_code == 422, (path, refused.text)
        assert "conversation" in refused.text and "unknown conversation" in refused.text
    assert _turns_in(a_conv) == 1  # nothing of B's landed in A's conversation

    # Naming a character, B starts a conversation of its own under the same name: A's is untouched.
    own = _post(base_url, B, started | {"message": "Hello."})
    assert own.status_code == 202, own.text
    assert _conversation_of(base_url, B, own.json()["id"]) != a_conv
    assert _turns_in(a_conv) == 1


def test_a_key_cannot_learn_that_another_keys_idempotency_key_exists(base_url) -> None:
    asked, other = (new_conversation() | {"message": m} for m in ("Two swords, please.", "A shield."))
    for b_body in (asked, other):  # B repeats A's request word for word, or asks something else
        key = f"order-{uuid.uuid4().hex}"
        a = _post(base_url, A, asked, **{"Idempotency-Key": key})
        assert a.status_code == 202, a.text
        b = _post(base_url, B, b_body, **{"Idempotency-Key": key})
        assert b.status_code == 202, b.text  # neither A's turn (200) nor a conflict with it (409)
        assert b.json()["created"] is True and b.json()["id"] != a.json()["id"]
        replay = _post(base_url, B, b_body, **{"Idempotency-Key": key})  # B's own key from now on
        assert replay.status_code == 200 and replay.json()["id"] == b.json()["id"]


def _upload(base_url: str, headers: dict[str, str], lines: list[dict]) -> str:
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    got = httpx.post(
        f"{base_url}/v1/files",
        headers=headers,
        files={"file": ("b.jsonl", content)},
        data={"purpose": "batch"},
    )
    assert got.status_code == 200, got.text
    return str(got.json()["id"])


def _batch(base_url: str, headers: dict[str, str], file_id: str, **extra: object) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/batches",
        headers=headers,
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        | extra,
    )


def test_keys_of_one_tenant_read_and_cancel_each_others_turns_and_no_other_key_does(
    base_url, monkeypatch
) -> None:
    from core.settings import ApiKey, settings

    shop = [
        ApiKey(key=f"shop-{n}-key-0123456789", name=f"shop-{n}", tenant="shop", scopes=["ingest"])
        for n in (1, 2)
    ]
    monkeypatch.setattr(settings, "api_keys", [*settings.api_keys, *shop])
    one, two = ({"X-API-Key": key.key} for key in shop)
    body, key = new_conversation() | {"message": "A room for the night?"}, f"room-{uuid.uuid4().hex}"
    first = _post(base_url, one, body, **{"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    replay = _post(base_url, two, body, **{"Idempotency-Key": key})  # the tenant's key: the same turn
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    turn = f"{base_url}/v1/turns/{first.json()['id']}"
    got = httpx.get(turn, headers=two)  # the key that got the id can read it
    assert got.status_code == 200 and got.json()["message"] == "A room for the night?", got.text
    assert "tenant" not in got.json() and got.json()["prompt"] is None
    assert httpx.delete(turn, headers=two).status_code == 200
    for stranger in (A, B):  # keys of other tenants see nothing, whatever they do
        assert httpx.get(turn, headers=stranger).status_code == 404
        assert httpx.delete(turn, headers=stranger).status_code == 404


def _validated(base_url: str, headers: dict[str, str], batch_id: str) -> dict:
    """The batch once its validation ended (within a minute)."""
    deadline = time.monotonic() + 60
    while (batch := httpx.get(f"{base_url}/v1/batches/{batch_id}", headers=headers).json())[
        "status"
    ] == "validating":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


def test_a_batch_line_cannot_name_another_tenants_conversation(base_url) -> None:
    started = new_conversation()
    first = _post(base_url, A, started | {"message": "The password is swordfish."})
    assert first.status_code == 202, first.text
    a_conv = _conversation_of(base_url, A, first.json()["id"])

    line = {"custom_id": "x1", "conversation": started["conversation"], "message": "What is the password?"}
    created = _batch(base_url, B, _upload(base_url, B, [line]))
    assert created.status_code == 200, created.text
    batch = _validated(base_url, B, created.json()["id"])
    assert batch["status"] == "failed", batch
    messages = [e["message"] for e in batch["errors"]["data"]]
    assert any("conversation" in m and started["conversation"] in m for m in messages), messages
    assert _turns_in(a_conv) == 1


def test_a_batch_refuses_a_scene_line_naming_it(base_url) -> None:
    """Scenes review: a scene line was taken through /v1/batches, whose output file then held lines
    `gate-17#1`… with no speaker and no opening, and no line for `gate-17` itself."""
    scene = {"participants": ["elara", "luffy"], "premise": "A rainy night.", "exchanges": 3}
    created = _batch(base_url, B, _upload(base_url, B, [{"custom_id": "gate-17", "scene": scene}]))
    assert created.status_code == 200, created.text
    batch = _validated(base_url, B, created.json()["id"])
    assert batch["status"] == "failed", batch
    messages = [e["message"] for e in batch["errors"]["data"]]
    assert any(m.startswith("scene: a batch takes no scene lines") for m in messages), messages
    # review: not stored with the run (a release before it refused an options key it did not know),
    # and a later release's key is left aside here the same way
    from services.runs.openai_lines import LineOptions

    assert "scenes" not in LineOptions(scenes=False).stored()
    assert LineOptions.of_stored({"candidates": 2, "a_later_option": True}) == LineOptions(candidates=2)


def test_allow_system_prompt_needs_an_admin_key(base_url) -> None:
    line = {
        "custom_id": "s1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "elara",
            "messages": [
                {"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "Hi"},
            ],
        },
    }
    refused = _batch(base_url, B, _upload(base_url, B, [line]), allow_system_prompt=True)
    assert refused.status_code == 403, refused.text
    assert "allow_system_prompt" in refused.text
    allowed = _batch(base_url, ADMIN, _upload(base_url, ADMIN, [line]), allow_system_prompt=True)
    assert allowed.status_code == 200, allowed.text


def _blocked_by(holder: int, *prefixes: str) -> bool:
    """Whether a session of this database waits on the backend `holder` (A, holding an uncommitted
    row) in a statement starting with one of `prefixes` (B's)."""
    with session_scope() as s:
        return bool(
            s.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND :holder = ANY(pg_blocking_pids(pid)) AND query LIKE ANY(:prefixes)"
                ),
                {"holder": holder, "prefixes": [p + "%" for p in prefixes]},
            )
        )


def _pid(session: Any) -> int:
    return int(session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


@pytest.mark.parametrize("lines", [1, 2], ids=["single-enqueue", "full-path"])
def test_a_conversation_started_meanwhile_is_not_reassigned(world, lines: int) -> None:
    """Producer B misses conversation X (A has not committed it), then finds it on insert: X keeps A's
    character, and B's turn is refused naming the conversation, with nothing of it stored. A single
    enqueue's one statement finds X on its insert too, writes nothing, and the full path after it
    finds X of another character; two lines take the full path at once, whose upsert finds X."""
    conversation = f"race-{uuid.uuid4().hex[:10]}"
    with session_scope() as s:
        ids = find_characters(session=s, slugs=["elara", "luffy"])
    get_autocommit_engine().dispose()  # a stale pooled connection would send B down the full path
    outcome: dict[str, object] = {}

    def producer_b() -> None:
        try:
            outcome["ids"] = enqueue_turns(
                [{"conversation": conversation, "character": "luffy", "message": "Ahoy!"}] * lines, send=False
            )
        except Exception as exc:  # noqa: BLE001 - the test reads what happened
            outcome["error"] = exc

    with session_scope() as a:
        upsert_conversations(
            session=a, rows=[{"external_id": conversation, "character_id": ids["elara"], "player_id": "p"}]
        )
        a.flush()
        holder = _pid(a)
        thread = threading.Thread(target=producer_b)
        thread.start()
        deadline = time.monotonic() + 30
        while not _blocked_by(holder, "INSERT INTO conversations", "WITH started AS"):  # B, on A's row
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.05)
    thread.join(timeout=30)
    assert not thread.is_alive()

    with session_scope() as s:
        conv = s.scalars(select(Conversation).where(Conversation.external_id == conversation)).one()
        assert conv.character_id == ids["elara"] and conv.player_id == "p"
        assert _turns_in(conv.id) == 0
    error = outcome.get("error")
    assert isinstance(error, TurnRejected), outcome
    assert conversation in error.errors[0].reason
    if lines == 1:
        assert error.errors[0].field == "character" and "belongs to character 'elara'" in str(error)
    else:
        assert error.errors[0].field == "conversation" and "just started" in str(error)


def test_a_first_turn_whose_key_is_taken_meanwhile_leaves_no_conversation(world) -> None:
    """Producer A holds an uncommitted turn under key K; B's single enqueue starts a new conversation
    with K. B's one statement passed its key check (A's row unseen), made the conversation, then
    waits on K; once A commits, its turn's INSERT fails the whole statement, conversation included,
    and the full path answers the key: another request's, refused. Nothing of B's is stored."""
    from core.settings import DEFAULT_TENANT
    from db.single_enqueue import create_turn_in_known_conversation
    from db.turns import IdempotencyConflict
    from services.producer import _new_turn
    from services.schemas import TurnRequest

    key = f"raced-{uuid.uuid4().hex[:10]}"
    mine = new_conversation()
    enqueue_turns([mine | {"message": "Hello."}], send=False)  # A's conversation exists
    started = f"race-{uuid.uuid4().hex[:10]}"
    get_autocommit_engine().dispose()  # a stale pooled connection would send B down the full path
    outcome: dict[str, object] = {}

    def producer_b() -> None:
        try:
            outcome["ids"] = enqueue_turns(
                [{"conversation": started, "character": "elara", "message": "Mine!", "idempotency_key": key}],
                send=False,
            )
        except Exception as exc:  # noqa: BLE001 - the test reads what happened
            outcome["error"] = exc

    with session_scope() as a:
        turn = _new_turn(
            TurnRequest.model_validate(mine | {"message": "A's.", "idempotency_key": key}),
            0,
            run_id=None,
            custom_id=None,
            api_key=None,
            tenant=DEFAULT_TENANT,
        )
        assert create_turn_in_known_conversation(
            connection=a.connection(), turn=turn, external_id=mine["conversation"], character="elara"
        )
        holder = _pid(a)
        thread = threading.Thread(target=producer_b)
        thread.start()
        deadline = time.monotonic() + 30
        while not _blocked_by(holder, "WITH started AS"):  # B waits on A's uncommitted key
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.05)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), IdempotencyConflict), outcome
    with session_scope() as s:
        assert s.scalar(select(func.count()).where(Conversation.external_id == started)) == 0


def test_upsert_conversations_reads_back_a_row_that_exists(world) -> None:
    """The plain function: a row that exists is read back (its own character), not overwritten."""
    conversation = f"race-{uuid.uuid4().hex[:10]}"
    with session_scope() as s:
        ids = find_characters(session=s, slugs=["elara", "luffy"])
        first = upsert_conversations(
            session=s, rows=[{"external_id": conversation, "character_id": ids["elara"]}]
        )
    with session_scope() as s:
        again = upsert_conversations(
            session=s, rows=[{"external_id": conversation, "character_id": ids["luffy"]}]
        )
        stored = s.scalar(select(Conversation.character_id).where(Conversation.external_id == conversation))
    assert stored == ids["elara"]
    assert again[conversation] == first[conversation] == (first[conversation][0], ids["elara"])


def test_a_continue_or_move_key_of_one_tenant_replays_nothing_of_another(base_url) -> None:
    """`:continue` and a fact's `:move` take an Idempotency-Key, stored per tenant: B's key that A used
    moves B's own fact and continues B's own group, rather than answering A's call as a replay."""
    key = f"tenant-wall-{uuid.uuid4().hex[:8]}"
    for headers in (A, B):
        player = f"p-{uuid.uuid4().hex[:8]}"
        pie = {"facts": [{"text": "Stole a pie."}]}
        made = httpx.post(f"{base_url}/v1/players/{player}/facts", headers=headers, json=pie)
        assert made.status_code == 201, made.text
        (fact,) = made.json()["facts"]
        moved = httpx.post(
            f"{base_url}/v1/players/{player}/facts/{fact['id']}:move",
            headers=headers | {"Idempotency-Key": key},
            json={"scope": "world"},
        )
        assert moved.status_code == 200, moved.text
        assert moved.json()["replayed"] is False and moved.json()["fact"]["scope"] == "world", moved.text

        group = f"wall-{uuid.uuid4().hex[:8]}"
        body = {"conversation": group, "participants": ["elara", "luffy"], "premise": "A quiet night."}
        started = httpx.post(f"{base_url}/v1/scenes", headers=headers, json=body, timeout=30)
        assert started.status_code == 201, started.text
        went_on = httpx.post(
            f"{base_url}/v1/scenes/{group}:continue",
            headers=headers | {"Idempotency-Key": key},
            json={"exchanges": 1},
            timeout=30,
        )
        assert went_on.status_code == 200, went_on.text
        assert went_on.json()["replayed"] is False and len(went_on.json()["sent"]) == 1, went_on.text


def test_an_inline_persona_is_the_default_tenants_own_never_listed_or_named_by_a_key(base_url) -> None:
    """Found in review (stop 65): the original service's inline shape stores each caller's persona as
    a character `inline-…` of the default tenant; every API key's `GET /v1/models` listed them, and a
    turn, a chat completion, a group or a batch naming one was answered with that persona's system
    prompt and scenario in its prompt. To a key they do not exist."""
    from db.world import all_character_slugs, upsert_character
    from memory.history_import import HistoryRefused, import_history

    slug = f"inline-secret-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        upsert_character(
            session=s, slug=slug, fields={"name": "Secret", "description": "Knows the vault code."}
        )
    models = httpx.get(f"{base_url}/v1/models", headers=A)
    assert models.status_code == 200 and slug not in {m["id"] for m in models.json()["data"]}
    assert httpx.get(f"{base_url}/v1/models/{slug}", headers=A).status_code == 404
    turn = _post(base_url, A, new_conversation() | {"character": slug, "message": "The code?"})
    assert turn.status_code == 422 and f"unknown character {slug!r}" in turn.text, turn.text
    chat = httpx.post(
        f"{base_url}/v1/chat/completions",
        headers=A,
        json={"model": slug, "messages": [{"role": "user", "content": "The code?"}]},
    )
    assert chat.status_code == 404 and "does not exist" in chat.text, chat.text
    group = httpx.post(
        f"{base_url}/v1/scenes",
        headers=A,
        json={"conversation": f"g-{uuid.uuid4().hex[:8]}", "participants": [slug, "elara"], "exchanges": 0},
    )
    assert group.status_code == 422 and "participants.0.character: unknown character" in group.text, (
        group.text
    )
    with session_scope() as s:  # the default tenant's own path (the inline shape, the CLI) finds it
        assert slug in find_characters(session=s, slugs=[slug])
        assert slug not in find_characters(session=s, slugs=[slug], tenant="game-a")
        assert slug not in all_character_slugs(session=s, tenant="game-a")  # a batch file's lines
    log = json.dumps({"name": "Rowan", "is_user": True, "mes": "The code?"})
    with pytest.raises(
        HistoryRefused, match=f"character: no character {slug!r}"
    ):  # an import for a key's tenant
        import_history(
            log, "sillytavern", conversation=f"h-{uuid.uuid4().hex[:8]}", character=slug, tenant="game-a"
        )


def test_two_tenants_turns_never_share_a_cached_prompt_prefix(engine, monkeypatch) -> None:
    """Found in review: vLLM's prefix cache was shared by every prompt, so a turn whose prompt began
    like another tenant's cached one answered its first token sooner, and its timings (first_token_ms,
    a stream's first delta) told whether that tenant's conversation began with a guessed history.
    Each tenant's prompts carry a cache salt of their own; one tenant's still share theirs."""
    from services.producer import submit_turns
    from worker.pipeline import process_batch, tenant_salt

    real = engine.llm.llm_engine.add_request
    salts: dict[int, str | None] = {}
    seeds = {611_011: "game-a", 622_022: "game-b", 633_033: "game-a"}  # apart: a retry takes the next seed

    def recording(request_id, prompt, params, **kwargs):  # type: ignore[no-untyped-def]
        if params.seed in seeds:  # the session's worker may be answering other cases' turns meanwhile
            salts[params.seed] = prompt.get("cache_salt")
        return real(request_id, prompt, params, **kwargs)

    monkeypatch.setattr(engine.llm.llm_engine, "add_request", recording)
    same = {"player_name": "Rowan", "message": "Is the north road safe tonight?"}
    turns = [
        submit_turns([new_conversation() | same | {"params": {"seed": seed}}], send=False, tenant=tenant)[
            0
        ].id
        for seed, tenant in seeds.items()
    ]
    report = process_batch(turns)
    assert sorted(report.done) == sorted(turns), report.failed  # the engine took the salted prompts
    assert salts == {seed: tenant_salt(tenant) for seed, tenant in seeds.items()}
    assert tenant_salt("game-a") != tenant_salt("game-b")


def test_an_ingest_keys_view_of_a_turn_holds_no_database_serial(base_url) -> None:
    """Found in review: a turn's `conversation_id` is the conversations table's serial, one sequence
    for every tenant: two readings of it told a tenant how many conversations every other tenant had
    started in between. An ingest key's view (the poll, the stream's done event, a callback) has none;
    an admin's keeps it."""
    sent = _post(base_url, A, new_conversation() | {"message": "Hello."})
    assert sent.status_code == 202, sent.text
    turn_id = sent.json()["id"]
    mine = httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=A)
    assert mine.status_code == 200 and "conversation_id" not in mine.json(), mine.json()
    operator = httpx.get(f"{base_url}/v1/turns/{turn_id}", headers={"X-API-Key": "test-key-1-abcdefgh"})
    assert isinstance(operator.json()["conversation_id"], int)


def test_a_groups_stop_and_an_uploads_key_are_the_tenants_own(base_url) -> None:
    """Review of this stop's doors: `:stop` of another tenant's group is a 404 that stops nothing, and
    an upload's Idempotency-Key another tenant used is a new upload for this one, never its file."""
    group = f"wall-stop-{uuid.uuid4().hex[:8]}"
    body = {"conversation": group, "participants": ["elara", "luffy"], "premise": "A quiet night."}
    started = httpx.post(f"{base_url}/v1/scenes", headers=A, json=body, timeout=30)
    assert started.status_code == 201, started.text
    stopped = httpx.post(f"{base_url}/v1/scenes/{group}:stop", headers=B, timeout=30)
    assert stopped.status_code == 404, stopped.text
    view = httpx.get(f"{base_url}/v1/scenes/{group}", headers=A, timeout=30)
    assert view.status_code == 200 and view.json()["status"] == "open", view.text
    key = {"Idempotency-Key": f"upload-wall-{uuid.uuid4().hex[:8]}"}
    ids = []
    for headers in (A, B):
        r = httpx.post(
            f"{base_url}/v1/files",
            headers=headers | key,
            files={"file": ("b.jsonl", b'{"a": 1}\n')},
            data={"purpose": "batch"},
        )
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    assert ids[0] != ids[1]
