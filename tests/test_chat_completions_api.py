"""POST /v1/chat/completions at the HTTP boundary, with no worker: retries of the official client,
idempotency, refusals of bad `model` values, OpenAI's error `param`; and the turn wait's back-off."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from core.settings import DEFAULT_TENANT, settings
from db.models import Conversation, Turn, TurnStatus
from db.session import session_scope
from db.turns import cancel_turns
from services import live_chat, producer
from services.producer import TurnView
from services.schemas import TurnRequest
from services.turn_wait import await_finished
from tasks import generate
from tests.conftest import (
    INGEST_KEY,
    another_session_waits_on_a_lock,
    new_conversation,
    off_the_worker,
    patch_on_this_thread,
)

OWNER = {"X-API-Key": INGEST_KEY}


def _turns_of(conversation: str) -> list[uuid.UUID]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Turn.id)
                .join(Conversation, Conversation.id == Turn.conversation_id)
                .where(Conversation.external_id == conversation)
            )
        )


def _cancel(turn_ids: list[uuid.UUID]) -> None:
    """No worker of a later test picks these up."""
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=turn_ids)


@pytest.fixture(autouse=True)
def no_worker(request, monkeypatch):  # type: ignore[no-untyped-def]
    """The turns sent over HTTP go to a queue nobody consumes: the session's worker answered a turn
    whose stored history a test read as the request had left it."""
    if "base_url" not in request.fixturenames:
        yield
        return
    from tests.conftest import sent_to_nobody

    with sent_to_nobody(monkeypatch, "gen.chat-completions-check.live"):
        yield


@pytest.fixture
def short_wait(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(settings, "turn_wait_max_s", 0.3)


def _refused_through_the_client(base_url: str) -> tuple[openai.InternalServerError, str]:
    """A chat completion asked through the official client (2 retries), expected to fail: its error
    and the conversation it named."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=2)
    conversation = new_conversation()["conversation"]
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model="elara",
            messages=[{"role": "user", "content": "Which road leads north?"}],
            metadata={"conversation": conversation},
        )
    return raised.value, conversation


def test_the_official_client_does_not_retry_a_timeout_into_a_second_turn(base_url, short_wait) -> None:
    error, conversation = _refused_through_the_client(base_url)
    assert error.status_code == 504
    assert error.response.headers["x-should-retry"] == "false"
    stored = _turns_of(conversation)
    _cancel(stored)
    assert len(stored) == 1  # the client's retries would each have queued another


def test_a_wait_the_servers_shutdown_cuts_short_is_a_504_the_client_does_not_retry(
    base_url, monkeypatch
) -> None:
    """Found in review: a non-streaming wait went on through a SIGTERM (uvicorn waits for it), so the
    supervisor's kill cut the connection and the official client sent the line again: a second turn
    in the conversation. It ends at the shutdown with the 504 that says where to read the turn."""
    import threading
    import time

    from sse_starlette.sse import AppStatus

    monkeypatch.setattr(settings, "turn_wait_max_s", 60.0)
    signalled = threading.Timer(1.0, lambda: setattr(AppStatus, "should_exit", True))
    started = time.monotonic()
    signalled.start()
    try:
        error, conversation = _refused_through_the_client(base_url)
    finally:
        signalled.cancel()
        AppStatus.should_exit = False
    assert time.monotonic() - started < 30  # well before the 60 s wait
    assert error.status_code == 504 and error.response.headers["x-should-retry"] == "false"
    assert "the server is restarting; the turn goes on: read it at /v1/turns/" in str(error), error
    stored = _turns_of(conversation)
    _cancel(stored)
    assert len(stored) == 1


def test_a_database_blip_while_waiting_is_waited_through_never_retried_into_a_second_turn(
    base_url, short_wait, monkeypatch
) -> None:
    """Found in review: a read that met a database blip while the turn was awaited was a 503 the
    official client retries, each retry queueing another live turn in the conversation."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from api.routes import chat_completions

    real, reads = chat_completions.visible_turn, []

    def blip_then_down(turn_id, who):  # type: ignore[no-untyped-def]
        reads.append(turn_id)
        if len(reads) == 2:  # one read goes through between blips
            return real(turn_id, who)
        raise OperationalError("SELECT", {}, psycopg.OperationalError("server closed the connection"))

    monkeypatch.setattr(chat_completions, "visible_turn", blip_then_down)
    error, conversation = _refused_through_the_client(base_url)
    assert error.status_code == 504 and len(reads) > 2  # read again, through the blips
    assert error.response.headers["x-should-retry"] == "false"
    stored = _turns_of(conversation)
    _cancel(stored)
    assert len(stored) == 1


def test_an_idempotency_key_makes_a_retry_answer_with_the_first_turn(base_url, short_wait) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0)
    key = {"Idempotency-Key": f"chat-{uuid.uuid4()}"}
    messages = [{"role": "user", "content": "Which road leads north?"}]
    named = []
    for _ in range(2):  # the caller's own retry, without a conversation: the key alone names the turn
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model="elara", messages=messages, extra_headers=key)  # type: ignore[arg-type]
        named.append(raised.value.response.json()["error"]["message"].split()[1])
    turn = producer.get_turn(uuid.UUID(named[0]))
    assert turn is not None and turn.tenant == "game-a"
    conversation = turn.conversation_id
    _cancel([turn.id])
    assert named[0] == named[1]
    with session_scope() as session:
        assert session.scalar(select(func.count(Turn.id)).where(Turn.conversation_id == conversation)) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "el\x00ara"),
        ("model", "el\ud800ara"),
        ("model", 7),
        ("model", ["elara"]),
        ("model", None),
        ("model", "e" * 100_000),
        ("model", ...),
        ("metadata.character", "el\x00ara"),
    ],
    ids=["nul", "surrogate", "number", "list", "null", "huge", "missing", "metadata-nul"],
)
def test_a_model_that_cannot_be_a_character_is_a_400_naming_it(base_url, field, value) -> None:
    body: dict = {"model": "elara", "messages": [{"role": "user", "content": "hi"}]}
    conversation = new_conversation()["conversation"]
    body["metadata"] = {"conversation": conversation}
    if field == "model" and value is ...:
        del body["model"]
    elif field == "model":
        body["model"] = value
    else:
        body["metadata"]["character"] = value
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=json.dumps(body),  # escapes the lone surrogate as JSON allows
        headers=OWNER | {"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(f"body.{field}:") and error["param"] == field
    assert "Value error" not in error["message"]  # pydantic's prefix (review of error texts)
    assert _turns_of(conversation) == []


USER_HI = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"max_tokens": 0}, "body.max_tokens"),
        ({"max_completion_tokens": 10**6}, "body.max_completion_tokens"),
        ({"max_completion_tokens": None, "max_tokens": 0}, "body.max_tokens"),
        ({"temperature": 9}, "body.temperature"),
        ({"user": "u" * 201}, "body.user"),
        ({"metadata": {"conversation": 5}}, "body.metadata.conversation"),
        ({"response_format": {"type": "xml"}}, "body.response_format"),
        (
            {"messages": [{"role": "system", "content": "s" * 20_001}, {"role": "user", "content": "hi"}]},
            "body.messages",
        ),
        (  # found in review: an earlier line had no limit here (a run line's history has 20,000)
            {"messages": [{"role": "assistant", "content": "a" * 20_001}, {"role": "user", "content": "hi"}]},
            "body.messages[0].content",
        ),
        (  # found in review: the union's branch named (no param), "should be a valid string"
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "body.messages[0].content[0].type",
        ),
        (  # found in review: refused for its tool_call_id, not for being a tool message
            {"messages": [{"role": "tool", "tool_call_id": "a", "content": "x"}, USER_HI]},
            "body.messages[0].role",
        ),
    ],
    ids=[
        "max_tokens",
        "max_completion",
        "max_tokens-beside-null",
        "temperature",
        "user",
        "metadata-conv",
        "response_format",
        "system",
        "history-line",
        "image-part",
        "tool-message",
    ],
)
def test_a_bad_value_is_a_400_naming_the_request_field_it_came_in(base_url, change, field) -> None:
    # found in review: these named the turn's own fields (max_new_tokens, conversation, direction)
    # with no param, and response_format twice
    body = {"model": "elara", "messages": [{"role": "user", "content": "hi"}]} | change
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=OWNER)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(field), error
    assert error["param"].startswith(field.removeprefix("body.")), error  # as OpenAI names it (review)
    assert "Value error" not in error["message"]


def test_every_answer_names_its_conversation_so_a_stateless_one_can_be_erased(base_url, short_wait) -> None:
    """Found in review: a request naming no conversation (the `openai` client's usual stateless
    use) was answered in a `chat-<uuid>` conversation the game was never told of: a player's
    erasure could not name it, and the player's words stayed for good. Every answer names it in the
    X-Mlchat-Conversation header (percent-encoded UTF-8), a stream's too."""
    from urllib.parse import unquote

    body = {"model": "elara", "messages": [{"role": "user", "content": "My name is Jane Doe."}]}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=OWNER)
    named = unquote(r.headers[live_chat.CONVERSATION_HEADER])
    stored = _turns_of(named)
    _cancel(stored)
    assert r.status_code == 504 and named.startswith("chat-") and len(stored) == 1, r.text
    own = f"p42:엘라-{uuid.uuid4().hex[:6]}"
    r = httpx.post(
        f"{base_url}/v1/chat/completions", json=body | {"metadata": {"conversation": own}}, headers=OWNER
    )
    _cancel(_turns_of(own))
    assert unquote(r.headers[live_chat.CONVERSATION_HEADER]) == own
    # review: an ASCII name comes back as sent, to be sent again in the request header as it is
    ascii_name = f"steam:7656/npc guard-{uuid.uuid4().hex[:6]}"  # an inner space too (review)
    headers = OWNER | {live_chat.CONVERSATION_HEADER: ascii_name}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers)
    _cancel(_turns_of(ascii_name))
    assert r.headers[live_chat.CONVERSATION_HEADER] == ascii_name
    # review of that: a name ending in a space, sent as its header, dropped the connection (h11)
    spaced = f"guard {uuid.uuid4().hex[:6]} "
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body | {"user": spaced}, headers=OWNER)
    _cancel(_turns_of(spaced))
    assert r.status_code == 504 and unquote(r.headers[live_chat.CONVERSATION_HEADER]) == spaced, r.text
    assert r.headers[live_chat.CONVERSATION_HEADER].endswith("%20")
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body | {"stream": True}, headers=OWNER
    ) as s:
        streamed = unquote(s.headers[live_chat.CONVERSATION_HEADER])
    _cancel(_turns_of(streamed))
    assert streamed.startswith("chat-") and streamed != named


def test_a_chat_turn_stored_and_not_sent_is_a_503_naming_its_conversation(base_url, monkeypatch) -> None:
    """Found in the stop's reread: the broker away (or full), a stateless request's turn and its new
    `chat-<id>` conversation (the transcript in it) were stored and failed unsent, and the 503 named
    no conversation: no erasure could reach it, and each retry made another."""
    from services import producer as producer_module

    marker = f"not-sent-{uuid.uuid4().hex[:8]}"
    real = producer_module.send_stored

    def the_broker_away(stored, *, lane):  # type: ignore[no-untyped-def]
        with session_scope() as session:  # this test's turn alone: other tests' sends go on
            messages = session.scalars(select(Turn.message).where(Turn.id.in_([t.id for t in stored]))).all()
        if marker in messages:
            raise producer_module.EnqueueError("could not reach the broker; 1 turn(s) marked failed")
        return real(stored, lane=lane)

    monkeypatch.setattr(producer_module, "send_stored", the_broker_away)
    body = {"model": "elara", "messages": [{"role": "user", "content": marker}]}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=OWNER)
    assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
    named = r.headers[live_chat.CONVERSATION_HEADER]
    assert named.startswith("chat-") and len(_turns_of(named)) == 1
    assert "could not reach the broker" in r.json()["error"]["message"]


def test_metadata_character_names_the_character_when_model_does_not(base_url, short_wait) -> None:
    conversation = new_conversation()["conversation"]
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"conversation": conversation, "character": "elara"},
    }
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=OWNER)
    stored = _turns_of(conversation)
    _cancel(stored)
    assert r.status_code == 504 and len(stored) == 1  # queued for elara; no worker answers it here


def test_an_error_names_a_param_only_when_its_message_names_a_field() -> None:
    from api.routes.chat_completions import _error

    def param(message: str) -> str | None:
        return json.loads(_error(400, message).body)["error"]["param"]

    assert param("body.messages[1].content: a string") == "messages[1].content"  # OpenAI's name
    assert param("body.messages[-1].name: too long") == "messages[-1].name"
    assert param("body.stop.0: a string") == "stop.0"
    assert param("purpose: must be batch") == "purpose"
    assert param(f"turn {uuid.uuid4()} failed (engine_error): it broke: badly") is None
    assert param(f"turn {uuid.uuid4()} is still queued; read it at /v1/turns/x") is None


def test_stream_options_need_a_stream(base_url) -> None:
    body = {
        "model": "elara",
        "messages": [{"role": "user", "content": "hi"}],
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=OWNER)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    # Found in review: "stream": null, which OpenAI takes as false, was refused as body.stream.
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body | {"stream": None}, headers=OWNER)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body | {"stream": "yes"}, headers=OWNER)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_with_include_usage_every_chunk_carries_usage_null_as_openais_do() -> None:
    """Streaming review: the chunks before the last had no `usage` key, where OpenAI's carry null."""
    from services.live_chat import ChatTurn, chunk, usage_chunk

    asked = ChatTurn(id=uuid.uuid4(), character="elara", created=0, stream=True, include_usage=True)
    assert chunk(asked, {"content": "Hi"})["usage"] is None
    assert usage_chunk(asked, {"prompt_tokens": 3})["usage"]["total_tokens"] == 3
    assert "usage" not in chunk(dataclasses.replace(asked, include_usage=False), {"content": "Hi"})


def test_the_turn_wait_backs_off_to_a_read_a_second() -> None:
    (stored,) = producer.submit_turns(
        [TurnRequest(**new_conversation(), message="hi")], send=False, api_key="game-a", tenant="game-a"
    )
    reads = 0

    async def read() -> TurnView:
        nonlocal reads
        reads += 1
        view = producer.get_turn(stored.id)
        assert view is not None
        return view

    view = asyncio.run(await_finished(read, 3.0))
    _cancel([stored.id])
    assert view.status.value == "queued"
    assert 4 <= reads <= 8  # 0.1 s doubling to 1 s over 3 s: 7 reads; every 0.1 s it was 31


def test_a_plain_request_hashes_as_before_the_text_default(world) -> None:
    """An Idempotency-Key retry of a completion stored before OpenAI requests defaulted to
    response_format text must still match: the default is hashed as absent."""
    from services.live_chat import start_chat_turn

    conversation = new_conversation()["conversation"]
    key = f"chat-{uuid.uuid4()}"
    body = {"model": "elara", "messages": [{"role": "user", "content": "hi"}]}
    turn = start_chat_turn(
        body, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, conversation=conversation, idempotency_key=key
    )
    _cancel([turn.id])
    with session_scope() as session:
        stored = session.scalar(select(Turn.request_hash).where(Turn.id == turn.id))
    assert stored is not None
    plain = TurnRequest(conversation=conversation, character="elara", message="hi", idempotency_key=key)
    with_default = TurnRequest.model_validate(
        plain.model_dump() | {"params": {"response_format": {"type": "text"}}}
    )
    assert stored == plain.request_hash() != with_default.request_hash()
    # Review (stop 76): `n: 1` (many wrappers' default), kept by batch lines since, hashes as absent.
    again = start_chat_turn(
        body | {"n": 1},
        api_key=INGEST_KEY,
        tenant=DEFAULT_TENANT,
        conversation=conversation,
        idempotency_key=key,
    )
    assert again.id == turn.id
    # Review: a dropped stream retried as a plain call with its key was a 409 (the flag was hashed).
    streamed_key = f"chat-{uuid.uuid4()}"
    first = start_chat_turn(
        body | {"stream": True},
        api_key=INGEST_KEY,
        tenant=DEFAULT_TENANT,
        conversation=conversation,
        idempotency_key=streamed_key,
    )
    retry = start_chat_turn(
        body,
        api_key=INGEST_KEY,
        tenant=DEFAULT_TENANT,
        conversation=conversation,
        idempotency_key=streamed_key,
    )
    assert retry.id == first.id
    _cancel([first.id])


def test_an_npc_reply_sent_back_seeds_its_say_and_the_request_hashes_its_messages_as_sent(world) -> None:
    """Review (stop 76): an NPC reply's JSON, sent back in a chat completion's messages, seeded a new
    conversation as the character's line; kept as its say, the request's fingerprint stays over the
    messages as sent (a keyed retry across the upgrade still matches)."""
    import json

    from db.models import Message
    from services.live_chat import start_chat_turn

    conversation = new_conversation()["conversation"]
    key = f"chat-{uuid.uuid4()}"
    said = json.dumps({"say": "North, past the well.", "emotion": "neutral", "action": None})
    history = [{"role": "user", "content": "Where is the tower?"}, {"role": "assistant", "content": said}]
    body = {
        "model": "elara",
        "messages": [*history, {"role": "user", "content": "Thanks."}],
        "response_format": {"type": "npc"},
    }
    turn = start_chat_turn(
        body, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, conversation=conversation, idempotency_key=key
    )
    _cancel([turn.id])
    with session_scope() as session:
        stored = session.scalar(select(Turn.request_hash).where(Turn.id == turn.id))
        lines = session.scalars(
            select(Message.content)
            .join(Turn, Turn.conversation_id == Message.conversation_id)
            .where(Turn.id == turn.id, Message.role == "assistant")
        ).all()
    assert list(lines) == ["North, past the well."]
    asked = TurnRequest(
        conversation=conversation,
        character="elara",
        message="Thanks.",
        idempotency_key=key,
        params={"response_format": {"type": "npc"}},
    ).with_earlier_messages(history)
    assert stored == asked.request_hash()
    # review: a say whose JSON escapes decode to what no line can hold (a NUL) is kept as sent
    nul = json.dumps({"say": "a\u0000b", "emotion": "neutral", "action": None})
    other = new_conversation()["conversation"]
    odd = body | {"messages": [history[0], {"role": "assistant", "content": nul}, body["messages"][-1]]}
    turn = start_chat_turn(
        odd, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, conversation=other, idempotency_key=None
    )
    _cancel([turn.id])
    with session_scope() as session:
        kept = session.scalars(
            select(Message.content)
            .join(Turn, Turn.conversation_id == Message.conversation_id)
            .where(Turn.id == turn.id, Message.role == "assistant")
        ).all()
    assert list(kept) == [nul]


def test_a_key_reused_with_other_earlier_messages_is_a_conflict_not_a_replay_that_seeds_them(
    world, monkeypatch
) -> None:
    """Found in review: a chat completion's fingerprint left its earlier messages out, so a request
    reusing a key with other earlier messages was taken for a retry: answered with the first turn,
    and its messages seeded into that turn's conversation, which the first request never sent."""
    from db.models import Message
    from services.live_chat import start_chat_turn

    never = off_the_worker(generate.dispatch, lambda ids, **kwargs: None)  # stored, never answered
    monkeypatch.setattr(generate, "dispatch", never)
    key = f"chat-{uuid.uuid4()}"
    first = {"model": "luffy", "messages": [{"role": "user", "content": "hi"}]}
    earlier = [
        {"role": "user", "content": "I burned your ship."},
        {"role": "assistant", "content": "You WHAT?"},
    ]
    other = {"model": "luffy", "messages": [*earlier, {"role": "user", "content": "hi"}]}
    turn = start_chat_turn(first, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, idempotency_key=key)
    with pytest.raises(live_chat.ChatRejected) as refused:
        start_chat_turn(other, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, idempotency_key=key)
    assert refused.value.status == 409
    with session_scope() as session:
        conversation = session.scalar(select(Turn.conversation_id).where(Turn.id == turn.id))
        seeded = session.scalars(select(Message.content).where(Message.conversation_id == conversation)).all()
    assert seeded == []  # nothing of the other request's messages
    # The same request again, earlier messages and all, is still a replay of its own turn.
    again_key = f"chat-{uuid.uuid4()}"
    mine = start_chat_turn(other, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, idempotency_key=again_key)
    replay = start_chat_turn(other, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, idempotency_key=again_key)
    assert replay.id == mine.id
    _cancel([turn.id, mine.id])


def test_a_retry_after_the_broker_was_down_sends_the_turn_it_revives(world, monkeypatch) -> None:
    """Found in review: the first request's send failed (the turn marked failed, a 503); the client's
    retry with the same Idempotency-Key revived it as queued but sent nothing, so it waited for the
    sweeper's visibility timeout (an hour), and the conversation's later turns behind it."""
    from services.live_chat import start_chat_turn
    from services.producer import EnqueueError

    sent: list[list[uuid.UUID]] = []

    def broker(ids, *, model, lane, **kwargs):  # type: ignore[no-untyped-def]
        if not sent:
            sent.append([])
            raise ConnectionError("broker down")
        sent.append(list(ids))

    monkeypatch.setattr(generate, "dispatch", off_the_worker(generate.dispatch, broker))
    conversation = new_conversation()["conversation"]
    key = f"chat-{uuid.uuid4()}"
    body = {"model": "elara", "messages": [{"role": "user", "content": "Is the ferry running?"}]}
    with pytest.raises(EnqueueError):
        start_chat_turn(
            body, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, conversation=conversation, idempotency_key=key
        )
    turn = start_chat_turn(
        body, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, conversation=conversation, idempotency_key=key
    )
    _cancel([turn.id])
    assert sent == [[], [turn.id]]
    with pytest.raises(live_chat.ChatRejected, match=r"^Idempotency-Key \(header\): .*mlchat's own"):
        start_chat_turn(body, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, idempotency_key="run:x:y")


def test_a_request_whose_history_is_not_stored_stores_no_turn_and_its_retry_sends_both(
    world, monkeypatch
) -> None:
    """Review (a process killed between two commits): the turn was committed, then its earlier
    messages in a transaction of their own; an API killed in between left a turn the worker answered
    without them, and that first reply kept every later seed out of the conversation for good. The
    history is stored in the turn's transaction: a failure there (standing in for the kill) stores
    neither, and the client's retry stores and sends both."""
    from db.models import Message
    from services import producer
    from services.live_chat import start_chat_turn

    sent: list[uuid.UUID] = []
    kept = off_the_worker(generate.dispatch, lambda ids, *, model, lane, **kwargs: sent.extend(ids))
    monkeypatch.setattr(generate, "dispatch", kept)
    real, failed = producer.append_history_if_empty, []

    def append_once(**kwargs):  # type: ignore[no-untyped-def]
        real(**kwargs)
        if not failed:
            failed.append(True)
            raise RuntimeError("the API process died here")

    patch_on_this_thread(monkeypatch, producer, "append_history_if_empty", append_once)
    conversation = new_conversation()["conversation"]
    key = f"chat-{uuid.uuid4()}"
    messages = [
        {"role": "user", "content": "Evening."},
        {"role": "assistant", "content": "Evening, traveller."},
        {"role": "user", "content": "Is the ferry running?"},
    ]
    body = {"model": "elara", "messages": messages}
    with pytest.raises(RuntimeError):
        start_chat_turn(
            body, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, conversation=conversation, idempotency_key=key
        )
    assert sent == []
    with session_scope() as session:  # neither the turn nor its history
        assert (
            session.scalar(
                select(func.count()).where(Turn.tenant == DEFAULT_TENANT, Turn.idempotency_key == key)
            )
            == 0
        )
    turn = start_chat_turn(
        body, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, conversation=conversation, idempotency_key=key
    )
    _cancel([turn.id])
    assert sent == [turn.id]
    with session_scope() as session:
        conv_id = session.scalar(select(Turn.conversation_id).where(Turn.id == turn.id))
        lines = session.scalars(
            select(Message.content).where(Message.conversation_id == conv_id).order_by(Message.seq)
        ).all()
    assert lines == ["Evening.", "Evening, traveller."]


def test_the_conversation_header_names_it_and_earlier_messages_seed_only_a_new_one(
    base_url, short_wait
) -> None:
    from db.models import Message

    conversation, elsewhere = (new_conversation()["conversation"] for _ in range(2))
    headers = OWNER | {live_chat.CONVERSATION_HEADER: conversation}
    seed = [
        {"role": "user", "content": "I am Rowan, from the coast."},
        {"role": "assistant", "content": "Welcome, Rowan."},
    ]
    body = {
        "model": "elara",
        "messages": [*seed, {"role": "user", "content": "Which road leads north?"}],
        "user": elsewhere,  # the header wins over `user` and metadata
        "metadata": {"conversation": elsewhere},
    }
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 504, r.text  # queued, no worker here
    (first,) = _turns_of(conversation)
    assert _turns_of(elsewhere) == []

    def history() -> list[tuple[str, str]]:
        with session_scope() as session:
            rows = session.execute(
                select(Message.role, Message.content)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Conversation.external_id == conversation)
                .order_by(Message.seq)
            )
            return [(role.value, content) for role, content in rows]

    assert history() == [(m["role"], m["content"]) for m in seed]
    body["messages"] = [
        {"role": "user", "content": "I am someone else entirely."},
        {"role": "assistant", "content": "So you are."},
        {"role": "user", "content": "And the road east?"},
    ]
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 504, r.text
    assert history() == [(m["role"], m["content"]) for m in seed]  # its stored history is the memory
    turns = _turns_of(conversation)
    assert len(turns) == 2 and first in turns
    _cancel(turns)


def test_a_utf8_conversation_header_names_the_conversation_its_body_twin_names(base_url, short_wait) -> None:
    """Found in review: header bytes are decoded as Latin-1, so "민수-…" sent as UTF-8 in the header
    arrived as mojibake and named another conversation than the same id in `metadata.conversation`;
    and its length counted bytes (67 Hangul were 201 characters: a 422 the body accepts)."""
    conversation = "민수-" + new_conversation()["conversation"]
    body = {"model": "elara", "messages": [{"role": "user", "content": "Hello?"}]}
    in_body = body | {"metadata": {"conversation": conversation}}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=in_body, headers=OWNER, timeout=30)
    assert r.status_code == 504, r.text  # queued, no worker here
    headers = OWNER | {live_chat.CONVERSATION_HEADER: conversation.encode()}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 504, r.text
    turns = _turns_of(conversation)
    assert len(turns) == 2  # one conversation
    long_id = "가" * 67  # 201 bytes, 67 characters
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        json=body,
        headers=OWNER | {live_chat.CONVERSATION_HEADER: long_id.encode()},
        timeout=30,
    )
    assert r.status_code == 504, r.text
    turns += _turns_of(long_id)
    assert len(turns) == 3
    _cancel(turns)


@pytest.mark.parametrize(("error_code", "status"), [("attempts_exhausted", 502), ("prompt_too_long", 400)])
def test_a_failed_turn_is_answered_502_or_400_when_the_request_was_at_fault(
    base_url, short_wait, error_code, status
) -> None:
    from sqlalchemy import update

    body = {"model": "elara", "messages": [{"role": "user", "content": "Which road leads north?"}]}
    headers = OWNER | {"Idempotency-Key": f"chat-{uuid.uuid4()}"}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 504, r.text
    turn_id = uuid.UUID(r.json()["error"]["message"].split()[1])
    with session_scope() as session:
        session.execute(
            update(Turn)
            .where(Turn.id == turn_id)
            .values(
                status=TurnStatus.FAILED, error_code=error_code, error="it failed", finished_at=func.now()
            )
        )
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)  # the replay
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (
        str(turn_id) in error["message"] and error_code in error["message"] and error["type"] == "turn_failed"
    )
    assert error["code"] == error_code  # as a streamed failure's event carries it (review of error texts)


def test_a_cancelled_turn_is_answered_409_cancelled_not_a_server_failure(base_url, short_wait) -> None:
    """Found in review: a turn cancelled with DELETE /v1/turns/{id} came back as 502 turn_failed,
    a server failure, naming no cause."""
    body = {"model": "elara", "messages": [{"role": "user", "content": "Which road leads east?"}]}
    headers = OWNER | {"Idempotency-Key": f"chat-{uuid.uuid4()}"}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 504, r.text
    turn_id = uuid.UUID(r.json()["error"]["message"].split()[1])
    _cancel([turn_id])
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)  # the replay
    assert r.status_code == 409, r.text
    assert r.headers["x-should-retry"] == "false"
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("turn_cancelled", "cancelled")
    assert error["message"].startswith(f"turn {turn_id} was cancelled")


def test_two_requests_seeding_one_new_conversations_history_at_once_write_it_once(world) -> None:
    """Found in review: both counted no lines and inserted lines 1..n; the second collided with the
    first's on (conversation, seq), a 500 after its turn was committed."""
    import threading

    from db.models import Message
    from db.world import append_history_if_empty, find_conversations
    from services.producer import submit_turns

    conversation = new_conversation()
    submit_turns([conversation | {"message": "hi"}], send=False)
    with session_scope() as s:
        conv_id, _ = find_conversations(session=s, external_ids=[conversation["conversation"]])[
            conversation["conversation"]
        ]
    lines = [("user", "Is the ferry running?"), ("assistant", "Not in this wind.")]
    first_wrote = threading.Event()
    outcomes: list[object] = []
    waited: list[bool] = []

    def first() -> None:
        with session_scope() as s:
            outcomes.append(
                append_history_if_empty(session=s, conversation_id=conv_id, lines=lines, embeddings=None)
            )
            first_wrote.set()
            # the second request arrives while this one has not committed (review: a fixed pause let a
            # slow machine run the two one after the other)
            waited.append(another_session_waits_on_a_lock(held_by=s))

    def second() -> None:
        first_wrote.wait(10)
        try:
            with session_scope() as s:
                outcomes.append(
                    append_history_if_empty(session=s, conversation_id=conv_id, lines=lines, embeddings=None)
                )
        except Exception as exc:  # the collision, before the fix
            outcomes.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes == [2, 0] and waited == [True]
    with session_scope() as s:
        assert s.query(Message).filter(Message.conversation_id == conv_id).count() == 2


def test_a_conversation_of_another_character_or_a_reused_key_is_answered_in_openais_shape(
    base_url, short_wait
) -> None:
    """Found in review: a refusal from the store (the conversation is another character's, a key
    reused for another request) came back as mlchat's {"detail": ...}, naming `character`, which is
    no field of a chat request; the 409 was retried by the official client."""
    conversation = new_conversation()["conversation"]
    headers = OWNER | {live_chat.CONVERSATION_HEADER: conversation}
    first = {"model": "elara", "messages": [{"role": "user", "content": "Evening."}]}
    url = f"{base_url}/v1/chat/completions"
    assert httpx.post(url, json=first, headers=headers, timeout=30).status_code == 504
    other = first | {"model": "luffy"}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=other, headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    keyed = headers | {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    httpx.post(f"{base_url}/v1/chat/completions", json=first, headers=keyed, timeout=30)
    again = first | {"messages": [{"role": "user", "content": "Morning."}]}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=again, headers=keyed, timeout=30)
    assert r.status_code == 409 and "different request" in r.json()["error"]["message"], r.text
    assert r.headers["x-should-retry"] == "false"
    _cancel(_turns_of(conversation))


def test_a_stream_the_database_drops_is_resumed_after_its_last_delta_not_ended(monkeypatch) -> None:
    """Found in review: an outage while streaming (the hub's status check or the stored turn's read
    failing) ended the chat stream with a turn_error, which a chat client cannot resume: a transient
    failure shown as final."""
    from api.routes import chat_completions
    from streaming.reader import Event, unavailable

    turn = live_chat.ChatTurn(uuid.uuid4(), "elara", 0, stream=True)
    calls: list[tuple[str | None, str | None]] = []

    async def events(
        turn_id, read, *, last_event_id=None, max_s=None, shown_text=None, latest_claim_only=False
    ):  # type: ignore[no-untyped-def]
        assert max_s is not None and 0 < max_s <= settings.stream_max_s  # a resume gets what is left
        calls.append((last_event_id, shown_text))
        if len(calls) == 1:
            yield Event("delta", "1-0", {"text": "The road "})
            yield unavailable()
        else:
            yield Event("delta", "2-0", {"text": "north."})
            yield Event("done", None, {"usage": {"finish_reason": "stop"}})

    monkeypatch.setattr(chat_completions, "turn_events", events)
    monkeypatch.setattr(chat_completions, "RESUME_AFTER_S", 0.01, raising=False)

    async def collect() -> list[str]:
        return [c["data"] async for c in chat_completions._chunks(turn, None)]

    sent = asyncio.run(collect())
    texts = [json.loads(d)["choices"][0]["delta"].get("content") for d in sent[1:-2]]
    assert texts == ["The road ", "north."] and sent[-1] == "[DONE]", sent
    # the resume says what was sent: a stream that lost its place goes on from it, not `restarted`
    assert calls == [(None, None), ("1-0", "The road ")]


def test_a_live_answers_usage_pays_for_every_candidate_as_a_batch_lines_does() -> None:
    """Review (numeric correctness): a chat completion's usage counted the kept reply only, while a
    batch line's counts every candidate generated (a weak reply's regeneration, one dropped as
    unreadable): one rule for both (services/runs/openai_lines.py::paid_completion_tokens)."""
    stored = {"prompt_tokens": 50, "completion_tokens": 12, "generated_completion_tokens": 512}
    assert live_chat._usage(stored) == {"prompt_tokens": 50, "completion_tokens": 512, "total_tokens": 562}
    regenerated = [{"text": "First try.", "completion_tokens": 30}]  # a turn stored before the record
    assert (
        live_chat._usage({"prompt_tokens": 50, "completion_tokens": 12}, regenerated)["completion_tokens"]
        == 42
    )


def test_a_chat_completion_cannot_speak_into_a_group(world) -> None:
    """Found in review: a chat completion naming a live group's conversation was taken (its lead's
    name passed as `model`), the group's picker chose another member to answer while the completion
    said the lead spoke, and its earlier messages were seeded with no speaker. It is refused naming
    where the conversation came from, as a run's line is."""
    from scenes.spec import GroupSpec
    from services.live_chat import start_chat_turn
    from services.scenes import start_group

    conv = f"tavern-{uuid.uuid4().hex[:8]}"
    start_group(GroupSpec.model_validate({"conversation": conv, "participants": ["luffy", "elara"]}))
    body = {"model": "luffy", "messages": [{"role": "user", "content": "Elara, is the road safe?"}]}
    for named in ({"conversation": conv}, {}):
        asked = body | ({} if named else {"metadata": {"conversation": conv}})
        with pytest.raises(live_chat.ChatRejected, match="holds a scene") as refused:
            start_chat_turn(asked, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, **named)
        where = live_chat.CONVERSATION_HEADER if named else "body.metadata.conversation"
        assert str(refused.value).startswith(where) and refused.value.status == 400
    # review: naming a member who is not the lead was refused as another character's conversation
    with pytest.raises(live_chat.ChatRejected, match="holds a scene") as refused:
        start_chat_turn(
            body | {"model": "elara"}, api_key=INGEST_KEY, tenant=DEFAULT_TENANT, conversation=conv
        )
    assert str(refused.value).startswith(live_chat.CONVERSATION_HEADER)
    with session_scope() as session:
        conversation = session.scalar(select(Conversation.id).where(Conversation.external_id == conv))
        asked_turns = session.scalar(
            select(func.count()).select_from(Turn).where(Turn.conversation_id == conversation)
        )
    assert asked_turns == 0  # the group started with no exchange: no turn stored by either refusal


def test_a_wait_read_through_a_database_outage_ends_at_the_shutdown_too() -> None:
    """Review of the shutdown wait: while every read failed (the database away) the stop was never
    looked at, and the wait ran its full length through a SIGTERM."""
    import time

    async def away() -> TurnView:
        raise RuntimeError("the database is away")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="away"):
        asyncio.run(await_finished(away, 30.0, read_again_after=lambda exc: True, stop=lambda: True))
    assert time.monotonic() - started < 10  # at the first read, not after 30 s


def test_a_stream_that_cannot_be_resumed_ends_with_an_error_chunk_carrying_its_code(monkeypatch) -> None:
    """Found in review: the give-up chunk after the resumes ran out carried no `code`, where every
    other error chunk and the README say `unavailable`."""
    from api.routes import chat_completions

    async def unavailable(*args: Any):  # type: ignore[no-untyped-def]
        yield None  # the stream or the database away: resume

    monkeypatch.setattr(chat_completions, "_chunks_from", unavailable)
    monkeypatch.setattr(chat_completions, "MAX_RESUMES", 1)
    monkeypatch.setattr(chat_completions, "RESUME_AFTER_S", 0)
    turn = live_chat.ChatTurn(uuid.uuid4(), "elara", 0, stream=True)

    async def chunks() -> list[dict[str, Any]]:
        return [json.loads(c["data"]) async for c in chat_completions._chunks(turn, None)]

    *_, last = asyncio.run(chunks())
    assert last["error"]["code"] == "unavailable" and last["error"]["type"] == "turn_error", last
