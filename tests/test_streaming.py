"""Live streaming: a turn's SSE stream, its resume, its key isolation, the long poll, and the
OpenAI-compatible live endpoint with the official client (the last ones on the real worker)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import openai
import pytest

from db.session import session_scope
from db.turns import cancel_turns
from services import producer
from services.schemas import TurnRequest
from streaming.publisher import publisher
from tests.callback_receiver import receiving
from tests.conftest import HASHED_INGEST_KEY, INGEST_KEY, new_conversation

OWNER = {"X-API-Key": INGEST_KEY}  # key "game-a"
OTHER = {"X-API-Key": HASHED_INGEST_KEY}  # key "game-b"


def _events(response: httpx.Response, stop_after: int | None = None) -> list[tuple[str, str, dict]]:
    """(event, id, data) of an SSE response, as they arrive; stops after `stop_after` events."""
    out: list[tuple[str, str, dict]] = []
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in fields:
                out.append((fields.get("event", "message"), fields.get("id", ""), json.loads(fields["data"])))
                if stop_after is not None and len(out) >= stop_after:
                    return out
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    return out


def _queued_turn(stream: bool = True) -> uuid.UUID:
    """A turn of the `game-a` key, stored but never sent to a worker."""
    request = TurnRequest(**new_conversation(), message="Tell me of the road.", stream=stream)
    (stored,) = producer.submit_turns([request], send=False, api_key="game-a", tenant="game-a")
    return stored.id


def test_another_keys_stream_and_an_unknown_turn_are_404(base_url) -> None:
    turn_id = _queued_turn()
    assert httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=OWNER).status_code == 200
    with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=30) as r:
        assert r.status_code == 200  # the owner reads it: the 404 below is the key, not the turn
    assert httpx.get(f"{base_url}/v1/turns/{turn_id}", headers=OTHER).status_code == 404
    r = httpx.get(f"{base_url}/v1/turns/{turn_id}/stream", headers=OTHER)
    assert r.status_code == 404 and str(turn_id) in r.json()["detail"]
    r = httpx.get(f"{base_url}/v1/turns/{uuid.uuid4()}/stream", headers=OWNER)
    assert r.status_code == 404
    r = httpx.get(f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER | {"Last-Event-ID": "nonsense"})
    assert r.status_code == 422 and "Last-Event-ID" in r.text


@pytest.mark.parametrize("wait", ["-1", "1000000", "soon"])
def test_wait_out_of_range_is_422_naming_it(base_url, wait) -> None:
    r = httpx.get(f"{base_url}/v1/turns/{_queued_turn()}", params={"wait": wait}, headers=OWNER)
    assert r.status_code == 422 and "wait" in r.text


def test_the_long_poll_answers_when_the_turn_ends_not_at_its_bound(base_url) -> None:
    turn_id = _queued_turn()
    started = time.monotonic()
    r = httpx.get(f"{base_url}/v1/turns/{turn_id}", params={"wait": "0.5"}, headers=OWNER)
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert 0.5 <= time.monotonic() - started < 5
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])
    started = time.monotonic()
    r = httpx.get(f"{base_url}/v1/turns/{turn_id}", params={"wait": "30"}, headers=OWNER)
    assert r.json()["status"] == "cancelled" and time.monotonic() - started < 5


def test_a_long_poll_answers_when_the_turn_ends_while_it_waits(base_url) -> None:
    import threading

    turn_id = _queued_turn()

    def cancel_later() -> None:
        time.sleep(1.5)
        with session_scope() as session:
            cancel_turns(session=session, turn_ids=[turn_id])

    canceller = threading.Thread(target=cancel_later)
    started = time.monotonic()
    canceller.start()
    r = httpx.get(f"{base_url}/v1/turns/{turn_id}", params={"wait": "30"}, headers=OWNER, timeout=60)
    waited = time.monotonic() - started
    canceller.join()
    assert r.json()["status"] == "cancelled"
    assert 1.5 <= waited < 10, f"answered after {waited:.1f} s"  # at the turn's end, not at once or at 30 s


def test_a_streamed_turn_cancelled_through_the_api_ends_its_stream_at_once(base_url, monkeypatch) -> None:
    # No worker writes the end of a turn cancelled by the API: the cancel itself must, or the stream
    # waits for the readers' next status check (MLCHAT_STREAM_CHECK_S, then as long again for the end).
    from core.settings import settings

    monkeypatch.setattr(settings, "stream_check_s", 60.0)
    turn_id = _queued_turn()
    with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=90) as r:
        time.sleep(0.5)  # the reader follows the stream
        started = time.monotonic()
        cancelled = httpx.delete(f"{base_url}/v1/turns/{turn_id}", headers=OWNER)
        assert cancelled.json()["cancelled"] is True
        events = _events(r)
        waited = time.monotonic() - started
    assert [(event, data["status"]) for event, _, data in events] == [("error", "cancelled")]
    assert waited < 30, f"the stream ended {waited:.0f} s after the cancel"


def test_a_streamed_turn_the_claim_fails_ends_its_stream_at_once(base_url, monkeypatch) -> None:
    # A turn out of attempts is failed by the claim, which no worker answers: the claim's batch must
    # write the stream's end, or the stream waits for the readers' next status check (as above).
    from sqlalchemy import update

    from core.settings import settings
    from db.models import Turn
    from worker.pipeline import process_batch

    monkeypatch.setattr(settings, "stream_check_s", 60.0)
    turn_id = _queued_turn()
    with session_scope() as session:
        session.execute(update(Turn).where(Turn.id == turn_id).values(attempts=settings.max_attempts))
    with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=150) as r:
        time.sleep(0.5)  # the reader follows the stream
        started = time.monotonic()
        report = process_batch([turn_id])
        assert list(report.failed) == [turn_id]
        events = _events(r)
        waited = time.monotonic() - started
    assert [(event, data["status"]) for event, _, data in events] == [("error", "failed")]
    assert waited < 30, f"the stream ended {waited:.0f} s after the claim failed the turn"


def test_a_reader_of_a_turn_finished_long_ago_ends_at_once(base_url, monkeypatch) -> None:
    """Streaming review: a streamed turn finished minutes ago has no end entry left on its stream
    (it expires after ENDED_TTL_S); every reader that came then waited a status check more for the
    last deltas, which had long been written, before its `done`."""
    from sqlalchemy import text, update

    from core.settings import settings
    from db.models import Turn, TurnStatus

    monkeypatch.setattr(settings, "stream_check_s", 60.0)
    turn_id = _queued_turn()
    with session_scope() as session:
        session.execute(
            update(Turn)
            .where(Turn.id == turn_id)
            .values(
                status=TurnStatus.DONE,
                reply="The road is long.",
                finished_at=text("now() - interval '10 min'"),
            )
        )
    started = time.monotonic()
    with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=150) as r:
        events = _events(r)
    waited = time.monotonic() - started
    assert events[-1][0] == "done" and events[-1][2]["status"] == "done", events
    assert waited < 30, f"the stream ended {waited:.0f} s after it was opened"


def test_a_resume_whose_redis_connection_will_not_close_goes_on(world, monkeypatch) -> None:
    """Streaming review: closing the resume's own connection was unguarded; a peer that stopped
    answering made redis-py's close raise its timeout, and the resume with it (a 500 on `/stream`)."""
    import asyncio

    from redis.exceptions import TimeoutError as RedisTimeout

    from streaming import reader

    class WontClose:
        async def xrange(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return []  # the id is gone: the resume starts again from the stored reply

        async def aclose(self) -> None:
            raise RedisTimeout("Timeout closing the connection")

    monkeypatch.setattr(reader, "_client", WontClose)
    turn_id = _queued_turn()

    async def read() -> producer.TurnView:
        view = producer.get_turn(turn_id)
        assert view is not None
        return view

    opened = reader.TurnReader(turn_id, read, last_event_id="1-0")
    asyncio.run(opened.open())
    assert opened._restart_first  # it went on: the client is told to start again from the stored turn
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])


def _first_delta_of_a_turn_that_wrote(base_url: str, text: str) -> tuple[str, str, dict]:
    """A turn's stream that holds one delta of `text` (the turn then cancelled, its stream ended), as
    a reader gets its first event."""
    turn_id = _queued_turn()
    publisher().delta(turn_id, uuid.uuid4(), text)
    assert publisher().flush()
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])
    publisher().end(turn_id)
    with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=30) as r:
        (delta, *_) = _events(r)
    return delta


def test_each_delta_carries_when_the_worker_wrote_it(base_url) -> None:
    before = time.time()
    delta = _first_delta_of_a_turn_that_wrote(base_url, "Well met.")
    assert delta[0] == "delta" and delta[2]["text"] == "Well met."
    assert (
        before <= delta[2]["t"] <= time.time()
    )  # the delivery benchmark's reference (scripts/bench_streaming.py)


def test_a_delta_holding_a_unicode_line_end_stays_one_data_line_for_every_client(base_url) -> None:
    """Found in review: JSON leaves U+2028, U+2029 and U+0085 unescaped, and a client that splits the
    body's text with str.splitlines (httpx's iter_lines, as here; requests' iter_lines) cut a reply
    holding one (text pasted from the web) into two lines, neither of them JSON. They are escaped."""
    text = "Line one.\u2028Line two.\u2029Para.\x85Next."
    delta = _first_delta_of_a_turn_that_wrote(base_url, text)
    assert delta[0] == "delta" and delta[2]["text"] == text


def test_a_reader_that_resumes_with_last_event_id_loses_and_duplicates_nothing(base_url) -> None:
    turn_id = _queued_turn()
    claim = uuid.uuid4()
    pieces = ["Well", ", trav", "eller", ", the road", " north is", " long."]
    for piece in pieces[:4]:
        publisher().delta(turn_id, claim, piece)
    assert publisher().flush()
    url = f"{base_url}/v1/turns/{turn_id}/stream"
    with httpx.stream("GET", url, headers=OWNER, timeout=30) as first:
        assert first.headers["content-type"].startswith("text/event-stream")
        seen = _events(first, stop_after=2)  # then hangs up
    assert [e[0] for e in seen] == ["delta", "delta"]
    for piece in pieces[4:]:
        publisher().delta(turn_id, claim, piece)
    with session_scope() as session:  # the turn ends: its reader gets the terminal event
        cancel_turns(session=session, turn_ids=[turn_id])
    publisher().end(turn_id)
    with httpx.stream("GET", url, headers=OWNER | {"Last-Event-ID": seen[-1][1]}, timeout=30) as second:
        rest = _events(second)
    deltas = [e for e in seen + rest if e[0] == "delta"]
    assert "".join(d[2]["text"] for d in deltas) == "".join(pieces)
    assert len({d[1] for d in deltas}) == len(pieces)  # every id once
    assert rest[-1][0] == "error" and rest[-1][2]["status"] == "cancelled"


def _read_after_a_cancel(base_url: str, turn_id: uuid.UUID) -> list[tuple[str, str]]:
    """Cancel the turn, end its stream, and read it whole: (event, its text or code) of each event."""
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])
    publisher().end(turn_id)
    with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=30) as r:
        return [(e[0], e[2].get("text") or e[2].get("code")) for e in _events(r)]


def test_a_new_claim_tells_the_reader_to_discard_what_it_was_shown(base_url) -> None:
    turn_id = _queued_turn()
    publisher().delta(turn_id, uuid.uuid4(), "Half a rep")  # the worker that wrote this died
    publisher().delta(turn_id, uuid.uuid4(), "A whole reply.")
    assert _read_after_a_cancel(base_url, turn_id) == [
        ("delta", "Half a rep"),
        ("error", "restarted"),
        ("delta", "A whole reply."),
        ("error", "cancelled"),
    ]


def test_a_lapsed_claims_late_text_never_replaces_the_claim_that_took_the_turn_over(base_url) -> None:
    # Found in review: the claim whose delta came second was taken for the replacement, so text a
    # stalled worker wrote late, under the claim it had lost (attempt 1), replaced the new claim's
    # (attempt 2): a restart shown for nothing, and a chat completion (which cannot take text back)
    # ended with an error.
    turn_id = _queued_turn()
    lapsed, current = uuid.uuid4(), uuid.uuid4()
    publisher().delta(turn_id, current, "A whole ", rank=2)
    publisher().delta(turn_id, lapsed, "Half a rep", rank=1)  # its worker woke up late
    publisher().delta(turn_id, current, "reply.", rank=2)
    assert _read_after_a_cancel(base_url, turn_id) == [
        ("delta", "A whole "),
        ("delta", "reply."),
        ("error", "cancelled"),
    ]


def test_a_chat_reader_joining_late_follows_the_claim_of_the_highest_rank() -> None:
    from streaming.events import DELTA, Entry
    from streaming.reader import replaced_claims

    def deltas(*claims: tuple[str, int | None]) -> list[Entry]:
        return [Entry(id=f"{i}-0", kind=DELTA, text="x", claim=c, rank=r) for i, (c, r) in enumerate(claims)]

    assert replaced_claims(deltas(("new", 2), ("lapsed", 1), ("new", 2))) == {"lapsed"}  # wrote last
    assert replaced_claims(deltas(("old", 1), ("new", 2))) == {"old"}
    # A worker from before ranks (a rolling deploy): the latest claim, as before
    assert replaced_claims(deltas(("new", 2), ("unranked", None))) == {"new"}
    assert replaced_claims([]) == set()


def test_an_idle_stream_is_kept_alive_with_pings(base_url, monkeypatch) -> None:
    from core.settings import settings

    monkeypatch.setattr(settings, "stream_ping_s", 1.0)  # read per request; the API runs in this process
    turn_id = _queued_turn()  # never answered: the stream stays open with nothing to send
    url = f"{base_url}/v1/turns/{turn_id}/stream"
    pings = 0
    started = time.monotonic()
    with httpx.stream("GET", url, headers=OWNER, timeout=30) as response:
        for line in response.iter_lines():
            assert not line.startswith(("event:", "data:")), f"an event on an idle stream: {line!r}"
            pings += line.startswith(":")  # an SSE comment: sse-starlette's ping
            if pings == 2 or time.monotonic() - started > 20:
                break
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])
    assert pings == 2, f"{pings} pings in {time.monotonic() - started:.1f} s"


def _stored_view(turn_id: uuid.UUID):  # type: ignore[no-untyped-def]
    """The chat stream's read of the stored turn."""

    async def read() -> producer.TurnView:
        view = producer.get_turn(turn_id)
        assert view is not None
        return view

    return read


def test_a_chat_completion_stream_whose_worker_died_ends_with_an_error_object(world) -> None:
    """The documented path: OpenAI's chunk format has no way to take text back, so a restart ends the
    stream with an error object; the stored turn stays readable at /v1/turns/{id}."""
    import asyncio

    from sqlalchemy import text

    from api.routes.chat_completions import _chunks
    from db.turns import claim_turns
    from services.live_chat import ChatTurn

    turn_id = _queued_turn()
    with session_scope() as session:  # the claim answering it when the reader comes; its worker dies next
        claim = claim_turns(session=session, turn_ids=[turn_id], lease_s=60, max_attempts=3)
    publisher().delta(turn_id, claim.token, "Half a rep")
    assert publisher().flush()

    read = _stored_view(turn_id)

    async def frames() -> list[str]:
        turn = ChatTurn(turn_id, "elara", int(time.time()), stream=True)
        out = []
        async for frame in _chunks(turn, read):
            out.append(frame["data"])
            if "Half a rep" in frame["data"]:  # shown: now the next claim writes the reply again
                publisher().delta(turn_id, uuid.uuid4(), "A whole reply.")
                assert publisher().flush()
        return out

    try:
        data = asyncio.run(asyncio.wait_for(frames(), 60))
    finally:
        with session_scope() as session:
            session.execute(text("UPDATE turns SET lease_until = now() WHERE id = :t"), {"t": turn_id})
            cancel_turns(session=session, turn_ids=[turn_id])
    chunks = [json.loads(d) for d in data]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""},
        {"content": "Half a rep"},
    ]
    assert len(chunks) == 3 and chunks[2]["error"]["code"] == "restarted", chunks
    assert "[DONE]" not in data


def test_a_chat_retried_after_its_worker_died_is_shown_the_claim_answering_it_alone(world) -> None:
    """Found in review: a retry of a chat (the same Idempotency-Key, as the README advises) whose
    worker had died mid-stream followed the stream's latest claim, the dead one: it was shown text
    the stored reply never held, then `restarted` ended it once the next claim wrote. A reader that
    cannot take text back follows the claim answering the turn now, and no claim while it has none
    (here: the turn is queued again when the retry's reader opens; the next claim writes after)."""
    import asyncio

    from sqlalchemy import text

    from api.routes.chat_completions import _chunks
    from db.turns import claim_turns, store_replies
    from services.live_chat import ChatTurn
    from tests.outcomes import outcome_of

    turn_id = _queued_turn()
    publisher().delta(turn_id, uuid.uuid4(), "Half a rep", rank=0)  # its worker died; the turn went back
    assert publisher().flush()
    claims = []

    def next_claim_writes() -> None:
        with session_scope() as session:  # the next claim takes the turn, after the retry's reader opened
            claims.append(claim_turns(session=session, turn_ids=[turn_id], lease_s=60, max_attempts=3))
        (claim,) = claims
        publisher().delta(turn_id, claim.token, "A whole ", rank=1)
        publisher().delta(turn_id, claim.token, "reply.", rank=1)
        assert publisher().flush()
        with session_scope() as session:
            stored = store_replies(
                session=session, token=claim.token, outcomes=[outcome_of(claim.claimed[0], "A whole reply.")]
            )
        assert stored == [turn_id]
        publisher().end(turn_id)
        assert publisher().flush()

    read = _stored_view(turn_id)

    async def frames() -> list[str]:
        turn = ChatTurn(turn_id, "elara", int(time.time()), stream=True)
        return [frame["data"] async for frame in _chunks(turn, read)]

    writer = threading.Timer(1.0, next_claim_writes)  # after the retry's reader opened
    writer.start()
    try:
        data = asyncio.run(asyncio.wait_for(frames(), 60))
    finally:
        writer.join()
        with session_scope() as session:
            session.execute(text("UPDATE turns SET lease_until = now() WHERE id = :t"), {"t": turn_id})
            cancel_turns(session=session, turn_ids=[turn_id])
    chunks = [json.loads(d) for d in data if d != "[DONE]"]
    assert not [c for c in chunks if "error" in c], chunks
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "A whole reply."
    assert data[-1] == "[DONE]"


def test_a_streamed_turn_refuses_best_of_n(base_url) -> None:
    body = new_conversation() | {"message": "hi", "stream": True, "params": {"n": 2}}
    r = httpx.post(f"{base_url}/v1/turns", json=body, headers=OWNER)
    assert r.status_code == 422 and "stream" in r.text and "one candidate" in r.text


def test_chat_completions_refuse_what_they_cannot_answer_with_a_4xx(base_url) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="body.model"):  # as OpenAI answers an unknown model
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="elara", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="body.n"):
        client.chat.completions.create(model="elara", n=2, messages=[{"role": "user", "content": "hi"}])


# --- on the real worker ---------------------------------------------------------------------------


def test_the_openai_client_streams_a_live_turn_whose_chunks_add_up_to_the_stored_reply(
    base_url, celery_worker
) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0)
    conversation = new_conversation()["conversation"]
    stream = client.chat.completions.create(
        model="elara",
        messages=[{"role": "user", "content": "Which road leads north?"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=16,
        seed=3,
        metadata={"conversation": conversation},
    )
    *chunks, usage = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks + [usage])
    assert usage.choices == [] and usage.usage is not None  # OpenAI's last chunk for include_usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len([c for c in chunks if c.choices[0].delta.content]) >= 2  # written piece by piece
    turn_id = chunks[0].id.removeprefix("chatcmpl-")
    stored = producer.get_turn(turn_id)
    assert stored is not None and stored.status.value == "done" and stored.api_key == "game-a"
    assert text == stored.reply and stored.params.get("stream") is True
    assert usage.usage.completion_tokens == stored.usage["completion_tokens"] > 0

    # The same conversation, not streamed: the OpenAI shape, from the turn stored after the first.
    done = client.chat.completions.create(
        model="elara",
        messages=[{"role": "user", "content": "And what waits there?"}],
        max_tokens=8,
        user=conversation,
    )
    assert done.object == "chat.completion" and done.model == "elara"
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason in ("stop", "length")
    second = producer.get_turn(done.id.removeprefix("chatcmpl-"))
    assert second is not None and second.conversation_id == stored.conversation_id
    assert done.choices[0].message.content == second.reply
    assert done.usage is not None and done.usage.completion_tokens == second.usage["completion_tokens"]

    # The SSE stream of the finished turn replays it at once: the deltas, then `done` with the stored turn.
    with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=30) as r:
        events = _events(r)
    assert "".join(e[2]["text"] for e in events if e[0] == "delta") == stored.reply
    assert events[-1][0] == "done" and events[-1][2]["reply"] == stored.reply
    assert events[-1][2]["prompt"] is None  # an ingest key never sees the prompt


def test_a_streamed_turn_under_the_quality_gate_is_stored_as_shown_and_its_callback_is_retried(
    base_url, celery_worker, signing, monkeypatch
) -> None:
    """Regeneration on and a bar no reply meets: the streamed reply is stored as the reader saw it
    (never regenerated), with the gate's verdict in `done`; the turn's callback, refused once by its
    receiver, is posted again by the worker's Celery retry."""
    from db.models import Turn
    from services.callbacks import verify_signature

    monkeypatch.setattr(signing, "quality_regenerate", True)
    monkeypatch.setattr(signing, "quality_min_persona", 1.0)  # no reply is that close: each is below the bar
    monkeypatch.setattr(signing, "callback_allow_private", True)
    with receiving([500, 200]) as (url, received):
        body = new_conversation() | {
            "message": "Any rooms free tonight?",
            "stream": True,
            "callback_url": url,
            "params": {"max_new_tokens": 16, "seed": 11},
        }
        r = httpx.post(f"{base_url}/v1/turns", json=body, headers=OWNER)
        assert r.status_code == 202, r.text
        turn_id = r.json()["id"]
        with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=120) as s:
            events = _events(s)
        deadline = time.monotonic() + 60
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    stored = producer.get_turn(turn_id)
    assert stored is not None and stored.status.value == "done"
    assert "".join(e[2]["text"] for e in events if e[0] == "delta") == stored.reply
    assert [e[0] for e in events if e[0] != "delta"] == ["done"]  # no `restarted`: written once
    verdict = events[-1][2]["quality"]
    assert verdict["below_bar"] and "regenerated" not in verdict and verdict == stored.quality

    assert len(received) == 2, "the callback was not posted again after its receiver's 500"
    (first, _), (body_sent, signature) = received
    assert first == body_sent  # the same turn posted twice: the retry, not a second outcome
    theirs = httpx.get(f"{base_url}/v1/callbacks/secret", headers=OWNER).json()["secret"]
    assert verify_signature(signature, body_sent, theirs)  # the key's tenant's secret, not the operator's
    sent = json.loads(body_sent)
    assert sent["id"] == turn_id and sent["reply"] == stored.reply and sent["quality"] == stored.quality
    with session_scope() as session:
        turn = session.get(Turn, uuid.UUID(turn_id))
        assert turn.callback_attempts == 2 and turn.callback_delivered_at is not None

    # A chat completion's raw stream ends with OpenAI's `data: [DONE]` after its last chunk.
    request = {"model": "elara", "messages": [{"role": "user", "content": "Goodnight."}], "stream": True}
    request |= {"max_tokens": 8, "user": new_conversation()["conversation"]}
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=request, headers=OWNER, timeout=120
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data:")) for line in lines[:-1]]
    streamed = producer.get_turn(chunks[0]["id"].removeprefix("chatcmpl-"))
    assert streamed is not None
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == streamed.reply


def test_an_npc_reply_streams_its_spoken_line_and_a_chat_stream_sends_its_json_whole(
    base_url, celery_worker
) -> None:
    give = {
        "name": "give_item",
        "description": "Hand the player an item.",
        "args": {"item": {"type": "string"}},
    }
    body = new_conversation() | {
        "message": "I need a weapon, friend.",
        "stream": True,
        "params": {"max_new_tokens": 48, "seed": 5, "actions": [give]},
    }
    r = httpx.post(f"{base_url}/v1/turns", json=body, headers=OWNER)
    assert r.status_code == 202, r.text
    turn_id = r.json()["id"]
    with httpx.stream("GET", f"{base_url}/v1/turns/{turn_id}/stream", headers=OWNER, timeout=120) as s:
        events = _events(s)
    stored = producer.get_turn(turn_id)
    assert stored is not None and stored.status.value == "done", stored
    assert stored.structured is not None and stored.reply == stored.structured["say"]
    assert [e[0] for e in events if e[0] != "delta"] == ["done"]  # the JSON was never shown: no restart
    deltas = [e for e in events if e[0] == "delta"]
    assert "".join(d[2]["text"] for d in deltas) == stored.reply
    assert any(d[1] != "final" for d in deltas)  # shown as the engine wrote it, not made up at the end
    assert events[-1][2]["structured"] == stored.structured  # the action and emotion come with done

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="elara",
            messages=[{"role": "user", "content": "Have you a blade to spare?"}],
            stream=True,
            max_tokens=48,
            seed=5,
            user=new_conversation()["conversation"],
            extra_body={"response_format": {"type": "npc"}},
        )
    )  # no error object: it would raise openai.APIError here
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    chat_turn = producer.get_turn(chunks[0].id.removeprefix("chatcmpl-"))
    assert chat_turn is not None and chat_turn.structured is not None
    assert json.loads(content) == chat_turn.structured  # the JSON, as a call without stream answers it
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# --- per-turn callbacks ---------------------------------------------------------------------------


def _turns_of(conversation: str) -> int:
    """How many turns the conversation `conversation` of any tenant holds."""
    from sqlalchemy import func, select

    from db.models import Conversation, Turn

    with session_scope() as session:
        return (
            session.scalar(
                select(func.count(Turn.id))
                .join(Conversation, Conversation.id == Turn.conversation_id)
                .where(Conversation.external_id == conversation)
            )
            or 0
        )


@pytest.fixture
def signing(monkeypatch):  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    from core.settings import settings

    monkeypatch.setattr(settings, "callback_secret", SecretStr("turn-callback-secret"))
    return settings


def test_a_callback_to_a_private_address_is_a_422_naming_it_and_stores_nothing(base_url, signing) -> None:
    body = new_conversation() | {"message": "hi", "callback_url": "http://127.0.0.1:9/hook"}
    r = httpx.post(f"{base_url}/v1/turns", json=body, headers=OWNER)
    assert (
        r.status_code == 422 and "callback_url" in r.text and "does not resolve to a public address" in r.text
    )
    assert _turns_of(body["conversation"]) == 0
    body["callback_url"] = "ftp://example.com/hook"
    r = httpx.post(f"{base_url}/v1/turns", json=body, headers=OWNER)
    assert r.status_code == 422 and "http(s)" in r.text


def test_a_callback_without_a_signing_secret_is_a_422_naming_both(base_url, monkeypatch) -> None:
    from core.settings import settings

    monkeypatch.setattr(settings, "callback_secret", None)
    body = new_conversation() | {"message": "hi", "callback_url": "https://example.com/hook"}
    r = httpx.post(f"{base_url}/v1/turns", json=body, headers=OWNER)
    assert r.status_code == 422 and "callback_url" in r.text and "MLCHAT_CALLBACK_SECRET" in r.text
    assert _turns_of(body["conversation"]) == 0


def test_a_finished_turn_is_posted_signed_to_its_callback_once(signing, monkeypatch) -> None:
    from db.models import Turn
    from services.callbacks import CallbackFailed, tenant_secret, verify_signature
    from services.turn_callbacks import deliver_turn

    monkeypatch.setattr(signing, "callback_allow_private", True)
    with receiving([500, 200]) as (url, received):
        request = TurnRequest(**new_conversation(), message="Tell me of the road.", callback_url=url)
        (stored,) = producer.submit_turns([request], send=False, api_key="game-a", tenant="game-a")
        with session_scope() as session:
            cancel_turns(session=session, turn_ids=[stored.id])
        with pytest.raises(CallbackFailed, match="HTTP 500"):
            deliver_turn(stored.id)  # the task retries it
        assert deliver_turn(stored.id) is True
        assert deliver_turn(stored.id) is True  # delivered already: not posted again
    assert len(received) == 2
    body, signature = received[-1]
    assert verify_signature(signature, body, tenant_secret("game-a"))
    sent = json.loads(body)
    assert sent["id"] == str(stored.id) and sent["status"] == "cancelled" and sent["prompt"] is None
    with session_scope() as session:
        turn = session.get(Turn, stored.id)
        assert turn.callback_attempts == 2 and turn.callback_delivered_at is not None


def test_a_callback_a_worker_has_no_secret_to_sign_is_recorded_as_not_sent_not_requeued_unseen(
    world, signing, monkeypatch
) -> None:
    """Found in review: the API (with a secret) took the URL; a worker without one failed an assert
    before anything was recorded, so housekeeping queued the callback again at every pass, for ever,
    with no error to see why."""
    from db.models import Turn
    from services.callbacks import CallbackFailed
    from services.turn_callbacks import deliver_turn

    monkeypatch.setattr(signing, "callback_allow_private", True)
    with receiving([200]) as (url, received):
        request = TurnRequest(**new_conversation(), message="Tell me of the road.", callback_url=url)
        (stored,) = producer.submit_turns([request], send=False, api_key="game-a", tenant="game-a")
        with session_scope() as session:
            cancel_turns(session=session, turn_ids=[stored.id])
        monkeypatch.setattr(signing, "callback_secret", None)  # the worker's deployment lacks it
        with pytest.raises(CallbackFailed, match="MLCHAT_CALLBACK_SECRET"):
            deliver_turn(stored.id)
    assert received == []
    with session_scope() as session:
        turn = session.get(Turn, stored.id)
        assert turn.callback_attempts == 1 and "MLCHAT_CALLBACK_SECRET" in turn.callback_error


def test_housekeeping_queues_a_turn_callback_whose_message_was_lost(world, signing, monkeypatch) -> None:
    from sqlalchemy import text

    from db.callbacks import record_attempt
    from db.models import Turn
    from services import batches

    monkeypatch.setattr(signing, "callback_allow_private", True)
    lost, attempted, recent = (
        producer.submit_turns(
            [TurnRequest(**new_conversation(), message="hi", callback_url="http://127.0.0.1:9/hook")],
            send=False,
            api_key="game-a",
            tenant="game-a",
        )[0].id
        for _ in range(3)
    )
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[lost, attempted, recent])  # finished, never sent
        record_attempt(session=session, of=Turn, row_id=attempted, error="HTTP 500")  # its task retries it
        session.execute(
            text("UPDATE turns SET finished_at = now() - interval '10 minutes' WHERE id = ANY(:ids)"),
            {"ids": [lost, attempted]},
        )
    queued = batches.housekeeping()["turn_callbacks"]
    assert str(lost) in queued and str(attempted) not in queued and str(recent) not in queued


# --- mlchat chat ----------------------------------------------------------------------------------


def test_mlchat_chat_falls_back_to_the_stored_turn_when_the_stream_cannot_be_read(
    world, monkeypatch, capsys
) -> None:
    from scripts.cli import _print_as_written

    turn_id = _queued_turn()
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])
    # The broker's URL is resolved once per process: the reader is pointed where nothing listens.
    monkeypatch.setattr("streaming.reader.redis_url", lambda: "redis://127.0.0.1:1/0")
    started = time.monotonic()
    _print_as_written(turn_id, timeout=120)  # no traceback: the reader follows the stored turn
    assert time.monotonic() - started < 60  # it ended with the turn, not at its timeout
    assert capsys.readouterr().out == "\n"


def test_mlchat_chat_prints_the_reply_as_it_is_written(world, capsys) -> None:
    from scripts.cli import _print_as_written

    turn_id = _queued_turn()
    publisher().delta(turn_id, uuid.uuid4(), "Half a rep")  # the worker that wrote this died
    rewritten = uuid.uuid4()
    for piece in ["Well", ", traveller", ", the road is long."]:
        publisher().delta(turn_id, rewritten, piece)
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])
    publisher().end(turn_id)
    assert publisher().flush()
    _print_as_written(turn_id, timeout=60)
    printed = capsys.readouterr().out
    assert printed == "Half a rep\n[the reply is being written again]\nWell, traveller, the road is long.\n"


def test_a_long_poll_ends_at_the_servers_shutdown_with_the_turn_as_it_stands(base_url, monkeypatch) -> None:
    """Found in review: the long poll went on through a SIGTERM (uvicorn waits for every open
    request), so a deploy under long polls waited each one out, or was killed. It answers at the
    shutdown with the turn as it stands, as the chat completion's wait does."""
    import threading

    from sse_starlette.sse import AppStatus

    turn_id = _queued_turn()
    signalled = threading.Timer(1.0, lambda: setattr(AppStatus, "should_exit", True))
    started = time.monotonic()
    signalled.start()
    try:
        r = httpx.get(f"{base_url}/v1/turns/{turn_id}", params={"wait": "30"}, headers=OWNER, timeout=60)
    finally:
        signalled.cancel()
        AppStatus.should_exit = False
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert time.monotonic() - started < 10, "it waited out its 30 s"
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])
