"""The streaming transport against the real embedded Redis, without an engine: what a reader is
shown when it resumes, when entries repeat or two claims write at once, when Redis is away or hung,
and how long a stream may stay open."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import select

import streaming.publisher
import streaming.reader
from core.settings import settings
from db.models import Turn
from db.session import session_scope
from db.turns import cancel_turns
from services import producer
from services.producer import TurnView
from services.schemas import TurnRequest
from streaming.events import DELTA, END, Entry, redis_url, stream_key
from streaming.publisher import Publisher, publisher
from streaming.reader import Event, turn_events, valid_event_id
from tests.conftest import INGEST_KEY, new_conversation

pytestmark = pytest.mark.usefixtures("world")


def _turn() -> uuid.UUID:
    """A streamed turn of the `game-a` key, stored but never sent to a worker."""
    request = TurnRequest(**new_conversation(), message="Tell me of the road.", stream=True)
    (stored,) = producer.submit_turns([request], send=False, api_key="game-a", tenant="game-a")
    return stored.id


def _cancel(turn_id: uuid.UUID) -> None:
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=[turn_id])


def _xadd(turn_id: uuid.UUID, *entries: tuple[str, str, int | None]) -> list[str]:
    """(claim, text, seq) deltas straight into the turn's stream, as a worker's publisher writes them."""
    client = redis.Redis.from_url(redis_url())
    ids = []
    for claim, text, seq in entries:
        fields = {"kind": DELTA, "text": text, "claim": claim} | ({} if seq is None else {"seq": str(seq)})
        ids.append(client.xadd(stream_key(turn_id), fields).decode())
    return ids


def _end(turn_id: uuid.UUID) -> None:
    redis.Redis.from_url(redis_url()).xadd(stream_key(turn_id), {"kind": END})


def _read(
    turn_id: uuid.UUID,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    shown_text: str | None = None,
) -> list[Event]:
    """A reader's events (the first `stop_after`, then it hangs up), within 20 s."""

    async def read_turn() -> TurnView:
        view = producer.get_turn(turn_id)
        assert view is not None
        return view

    async def follow() -> list[Event]:
        out: list[Event] = []
        events = turn_events(turn_id, read_turn, last_event_id=last_event_id, shown_text=shown_text)
        async for event in events:
            out.append(event)
            if stop_after is not None and len(out) >= stop_after:
                break
        return out

    return asyncio.run(asyncio.wait_for(follow(), 20))


def _shown(events: list[Event]) -> str:
    """The text a client holds: the deltas after the last `restarted`."""
    text = ""
    for event in events:
        if event.kind == "error" and event.data.get("code") == "restarted":
            text = ""
        elif event.kind == "delta":
            text += event.data["text"]
    return text


def _codes(events: list[Event]) -> list[str]:
    return [e.data["text"] if e.kind == "delta" else e.data.get("code", e.kind) for e in events]


# --- resume ---------------------------------------------------------------------------------------


def test_a_reader_that_hangs_up_right_after_restarted_resumes_without_losing_the_new_text() -> None:
    turn_id = _turn()
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    _xadd(turn_id, (old, "Half a rep", 1), (new, "A whole", 1), (new, " reply.", 2))
    _cancel(turn_id)
    _end(turn_id)
    seen = _read(turn_id, stop_after=2)  # the old claim's delta, then `restarted`: it hangs up
    assert _codes(seen) == ["Half a rep", "restarted"]
    last = [e.id for e in seen if e.id is not None][-1]  # what an EventSource sends back
    rest = _read(turn_id, last_event_id=last)
    assert _shown(seen + rest) == "A whole reply."
    assert _codes(rest) == ["restarted", "A whole", " reply.", "cancelled"]


def test_a_resume_whose_entries_were_trimmed_starts_with_restarted() -> None:
    turn_id = _turn()
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    ids = _xadd(turn_id, (old, "Half", 1), (old, " a rep", 2), (new, "A whole", 1), (new, " reply.", 2))
    redis.Redis.from_url(redis_url()).xtrim(stream_key(turn_id), maxlen=2, approximate=False)
    _cancel(turn_id)
    _end(turn_id)
    rest = _read(turn_id, last_event_id=ids[0])  # it was shown "Half"
    assert _codes(rest) == ["restarted", "A whole", " reply.", "cancelled"]
    assert _shown(rest) == "A whole reply."


def test_a_resume_whose_claims_first_deltas_were_trimmed_starts_again_from_the_stored_reply() -> None:
    """Review of the dropped-delta fix: a claim whose first deltas were trimmed replays from a `seq`
    above 1, which read as a gap; the reply then came whole with no `restarted`, and a client that
    had shown its beginning showed it twice."""
    turn_id = _turn()
    claim = str(uuid.uuid4())
    ids = _xadd(turn_id, (claim, "The road", 1), (claim, " bends", 2), (claim, " north.", 3))
    redis.Redis.from_url(redis_url()).xtrim(stream_key(turn_id), maxlen=2, approximate=False)
    _answered(turn_id, "The road bends north.")
    _end(turn_id)
    rest = _read(turn_id, last_event_id=ids[1])  # it was shown "The road bends"
    assert _codes(rest)[0] == "restarted" and _shown(rest) == "The road bends north."


def test_a_resume_of_a_stream_that_expired_starts_with_restarted() -> None:
    turn_id = _turn()
    (shown_id,) = _xadd(turn_id, (str(uuid.uuid4()), "Well met", 1))
    redis.Redis.from_url(redis_url()).delete(stream_key(turn_id))
    _cancel(turn_id)
    assert _codes(_read(turn_id, last_event_id=shown_id)) == ["restarted", "cancelled"]


def _answered(turn_id: uuid.UUID, reply: str) -> None:
    """The turn stored as done with `reply` (as a worker's store leaves it, for what readers read)."""
    from sqlalchemy import update

    from db.models import Turn, TurnStatus

    with session_scope() as session:
        session.execute(
            update(Turn)
            .where(Turn.id == turn_id)
            .values(status=TurnStatus.DONE, reply=reply, finished_at=datetime.now(UTC))
        )


def test_a_resume_whose_place_is_lost_goes_on_after_the_text_its_caller_showed(monkeypatch) -> None:
    """Found in review: a chat completion's stream, resumed after a database blip, met a stream that
    no longer held its place (trimmed, expired) or could not be read (Redis away) and began with
    `restarted`, which ends a chat completion for good (it cannot take text back): a passing outage
    shown as final. A caller that says what it showed goes on from it."""
    turn_id = _turn()
    _answered(turn_id, "The road runs north.")
    assert _codes(_read(turn_id, last_event_id="1-0")) == ["restarted", "The road runs north.", "done"]
    resumed = _read(turn_id, last_event_id="1-0", shown_text="The road ")
    assert _codes(resumed) == ["runs north.", "done"]
    # text the stored reply does not start with (another claim wrote it): discarded, as before
    assert _codes(_read(turn_id, last_event_id="1-0", shown_text="A cart "))[0] == "restarted"
    # the place is there, but the claim's first deltas were trimmed (found in review of this fix)
    trimmed = _turn()
    (at,) = _xadd(trimmed, (str(uuid.uuid4()), "road ", 2))  # seq 1 is gone
    _answered(trimmed, "The road runs north.")
    assert _codes(_read(trimmed, last_event_id=at))[0] == "restarted"
    assert _codes(_read(trimmed, last_event_id=at, shown_text="The road ")) == ["runs north.", "done"]
    monkeypatch.setattr("streaming.reader.redis_url", lambda: "redis://127.0.0.1:1/0")  # Redis away
    assert _codes(_read(turn_id, last_event_id="1-0", shown_text="The road ")) == ["runs north.", "done"]


def test_a_resume_after_final_gets_done_alone() -> None:
    turn_id = _turn()
    claim = str(uuid.uuid4())
    _xadd(turn_id, (claim, "Well", 1), (claim, " met", 2))
    _answered(turn_id, "Well met, traveller.")  # the stream lacks the end: it comes as the `final` delta
    _end(turn_id)
    seen = _read(turn_id)
    assert [(e.kind, e.id) for e in seen[-2:]] == [("delta", "final"), ("done", "final")]
    assert _shown(seen) == "Well met, traveller."
    for resumed in (_read(turn_id, last_event_id="final"), _read(turn_id, last_event_id="final")):
        assert [e.kind for e in resumed] == ["done"]  # nothing shown twice
        assert resumed[0].data["reply"] == "Well met, traveller."


def test_a_turn_that_was_not_streamed_shows_its_reply_as_one_final_delta() -> None:
    request = TurnRequest(**new_conversation(), message="Tell me of the road.")  # no `stream`
    (stored,) = producer.submit_turns([request], send=False, api_key="game-a", tenant="game-a")
    _answered(stored.id, "The road is long.")
    events = _read(stored.id)
    assert [(e.kind, e.id) for e in events] == [("delta", "final"), ("done", "final")]
    assert events[0].data == {"text": "The road is long."}  # made up from the stored turn: no `t`


def test_a_turn_out_of_attempts_ends_its_stream_with_attempts_exhausted() -> None:
    from sqlalchemy import update

    from db.models import Turn, TurnStatus

    turn_id = _turn()
    claim = str(uuid.uuid4())
    _xadd(turn_id, (claim, "Half a rep", 1))  # the last attempt's worker died mid-reply
    with session_scope() as session:  # as the claim leaves a turn whose last lease lapsed
        session.execute(
            update(Turn)
            .where(Turn.id == turn_id)
            .values(
                status=TurnStatus.FAILED,
                error_code="attempts_exhausted",
                error="gave up after 3 attempts",
                finished_at=datetime.now(UTC),
            )
        )
    events = _read(turn_id)
    assert _codes(events) == ["Half a rep", "attempts_exhausted"]
    assert events[-1].data["status"] == "failed" and "gave up" in events[-1].data["message"]


def test_a_failed_turns_error_carries_no_id_and_a_turn_sent_again_streams_on() -> None:
    from db.turns import fail_unsent, revive_unsent

    turn_id = _turn()
    with session_scope() as session:  # its message never reached the broker: nothing was claimed
        sent_at = session.scalar(select(Turn.dispatched_at).where(Turn.id == turn_id))
        assert fail_unsent(
            session=session, turn_ids=[turn_id], reason="the broker was away", sent_at=sent_at
        ) == [turn_id]
    seen = _read(turn_id)
    assert _codes(seen) == ["broker_unreachable"] and seen[-1].id is None  # no `final`: it may yet run
    with session_scope() as session:  # a replay with its idempotency key sends it again
        assert revive_unsent(session=session, turn_ids=[turn_id]) == [turn_id]
    claim = str(uuid.uuid4())
    _xadd(turn_id, (claim, "Well", 1), (claim, " met.", 2))
    _answered(turn_id, "Well met.")
    _end(turn_id)
    rest = _read(turn_id)  # the reader comes back with no id: it was given none
    assert _codes(rest) == ["Well", " met.", "done"] and _shown(rest) == "Well met."


# --- repeats and two claims at once ---------------------------------------------------------------


def test_a_delta_the_publisher_sent_twice_is_shown_once() -> None:
    turn_id = _turn()
    claim = str(uuid.uuid4())
    ids = _xadd(turn_id, (claim, "Well", 1), (claim, " met", 2), (claim, " met", 2), (claim, ".", 3))
    _cancel(turn_id)
    _end(turn_id)
    events = _read(turn_id)
    assert _codes(events) == ["Well", " met", ".", "cancelled"]
    rest = _read(turn_id, last_event_id=ids[2])  # a resume after the repeat agrees with it
    assert _codes(rest) == [".", "cancelled"]


def test_a_delta_the_publisher_dropped_ends_the_live_text_and_the_stored_reply_brings_the_rest() -> None:
    """Found in review: a delta dropped while Redis failed the worker left a hole in the text shown
    (the next deltas were added after it); at the end the stored reply did not start with that text,
    so the reader got `restarted` and the whole reply again (a streamed chat completion ended in an
    error while the turn was done)."""
    turn_id = _turn()
    claim = str(uuid.uuid4())
    ids = _xadd(turn_id, (claim, "The road", 1), (claim, " bends", 2), (claim, " at the mill.", 4))  # 3 lost
    _answered(turn_id, "The road bends north at the mill.")
    _end(turn_id)
    events = _read(turn_id)
    assert _codes(events) == ["The road", " bends", " north at the mill.", "done"]
    assert "restarted" not in _codes(events) and _shown(events) == "The road bends north at the mill."
    rest = _read(turn_id, last_event_id=ids[1])  # a resume agrees
    assert _codes(rest) == [" north at the mill.", "done"]


def test_the_publisher_numbers_each_claims_deltas_from_one() -> None:
    turn_id, first, second = _turn(), uuid.uuid4(), uuid.uuid4()
    for claim, text in [(first, "a"), (first, "b"), (second, "c"), (second, "d")]:
        publisher().delta(turn_id, claim, text)
    # Found in review: the numbers were kept per turn, so a late delta of a lapsed claim still in
    # this process's engine restarted the new claim's count, and readers dropped its next deltas as
    # repeats (a hole in the text, then `restarted` at its end).
    for claim, text in [(first, "late"), (second, "e"), (first, "later"), (second, "f")]:
        publisher().delta(turn_id, claim, text)
    assert publisher().flush()
    raw: Any = redis.Redis.from_url(redis_url()).xrange(stream_key(turn_id))
    assert [Entry.parse(i, f).seq for i, f in raw] == [1, 2, 1, 2, 3, 3, 4, 4]


def test_the_publisher_keeps_each_stream_bounded_and_expiring(monkeypatch) -> None:
    monkeypatch.setattr(settings, "stream_max_len", 16)
    monkeypatch.setattr(settings, "stream_ttl_s", 120)
    client = redis.Redis.from_url(redis_url())
    turn_id, claim = uuid.uuid4(), uuid.uuid4()
    sink = Publisher(client)
    for i in range(1000):
        sink.delta(turn_id, claim, f"{i} ")
    assert sink.flush(timeout=30)
    # Trimming is approximate (`MAXLEN ~`): Redis drops whole nodes, so up to one node more is kept.
    node = int(client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    assert 16 <= client.xlen(stream_key(turn_id)) <= 16 + node < 1000
    assert client.xrevrange(stream_key(turn_id), count=1)[0][1][b"text"] == b"999 "  # the newest kept
    assert 0 < client.ttl(stream_key(turn_id)) <= 120
    # Found in review: an ended stream was kept as long as a live one (an hour by default); the
    # stored turn answers a reader that resumes after the end.
    monkeypatch.setattr(settings, "stream_ttl_s", 3600)
    sink.delta(turn_id, claim, "last words")
    assert sink.flush(timeout=30) and client.ttl(stream_key(turn_id)) > 300
    sink.end(turn_id)
    assert sink.flush(timeout=30)
    assert 0 < client.ttl(stream_key(turn_id)) <= streaming.publisher.ENDED_TTL_S


def _chat(turn_id: uuid.UUID) -> list[dict]:
    """A streamed chat completion's chunks for the turn, read from the start (a new request)."""
    from api.routes.chat_completions import _chunks
    from services.live_chat import ChatTurn

    async def read_turn() -> TurnView:
        view = producer.get_turn(turn_id)
        assert view is not None
        return view

    async def frames() -> list[str]:
        return [f["data"] async for f in _chunks(ChatTurn(turn_id, "elara", 0, stream=True), read_turn)]

    return [
        json.loads(d) if d != "[DONE]" else {"done": True}
        for d in asyncio.run(asyncio.wait_for(frames(), 20))
    ]


def test_a_chat_stream_read_after_a_restart_follows_the_claim_that_answered() -> None:
    """Found in review: a chat completion retried under its key once its turn had restarted read the
    stream from its start: the replaced claim's text, then `restarted`, which ends a chat stream; every
    retry failed the same way for as long as the stream lived, the turn done all along. And a claim
    whose first delta was lost showed nothing, yet its successor still sent `restarted`."""
    for first in [("old", "Half a rep", 1), ("old", "lost after a gap", 2)]:
        turn_id = _turn()
        old, new = str(uuid.uuid4()), str(uuid.uuid4())
        claims = {"old": old}
        _xadd(turn_id, (claims[first[0]], first[1], first[2]), (new, "A whole", 1), (new, " reply.", 2))
        _answered(turn_id, "A whole reply.")
        _end(turn_id)
        chunks = _chat(turn_id)
        assert not any("error" in c for c in chunks), chunks
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if "choices" in c)
        assert text == "A whole reply." and chunks[-1] == {"done": True}
    gap = _turn()
    lost_first, new = str(uuid.uuid4()), str(uuid.uuid4())
    _xadd(gap, (lost_first, "after its lost first delta", 2), (new, "A whole", 1), (new, " reply.", 2))
    _answered(gap, "A whole reply.")
    _end(gap)
    assert "restarted" not in _codes(_read(gap))  # nothing of the first claim was shown: no take-back


def test_a_superseded_claim_that_still_writes_is_ignored() -> None:
    turn_id = _turn()
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    _xadd(turn_id, (old, "Old", 1), (new, "New", 1), (old, " late", 2), (new, " text", 2), (old, "!", 3))
    _cancel(turn_id)
    _end(turn_id)
    assert _codes(_read(turn_id)) == ["Old", "restarted", "New", " text", "cancelled"]


# --- Redis away -----------------------------------------------------------------------------------


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once it is closed


def test_a_reader_whose_redis_is_unreachable_ends_with_the_stored_turn(monkeypatch) -> None:
    turn_id = _turn()
    (shown_id,) = _xadd(turn_id, (str(uuid.uuid4()), "Well met", 1))
    _cancel(turn_id)
    monkeypatch.setattr(streaming.reader, "redis_url", _closed_port)
    assert _codes(_read(turn_id)) == ["cancelled"]
    assert _codes(_read(turn_id, last_event_id=shown_id)) == ["restarted", "cancelled"]

    def cannot_start() -> str:  # found in review: a resume whose embedded Redis could not start was a 500
        raise RuntimeError("redis-server exited before it answered")

    monkeypatch.setattr(streaming.reader, "redis_url", cannot_start)
    assert _codes(_read(turn_id, last_event_id=shown_id)) == ["restarted", "cancelled"]


def _dropped(why: str) -> float:
    return REGISTRY.get_sample_value("mlchat_stream_events_dropped_total", {"why": why}) or 0.0


def test_the_publisher_drops_rather_than_blocks_while_redis_is_away() -> None:
    client = redis.Redis.from_url(_closed_port(), socket_connect_timeout=1, socket_timeout=1)
    sink = Publisher(client, max_queued=16)
    full = _dropped("queue_full")
    turn_id, claim = uuid.uuid4(), uuid.uuid4()
    started = time.monotonic()
    for i in range(2000):
        sink.delta(turn_id, claim, f"{i} ")
        assert sink._queue.qsize() <= 16
    assert time.monotonic() - started < 10  # the engine loop never waits on Redis (1 s a send if it did)
    assert _dropped("queue_full") > full
    # Redis never comes back: what is held is neither sent nor dropped, and flush says so in bounded
    # time (found in review: it said True, and a stopping worker lost the held rounds unreported).
    started = time.monotonic()
    assert not sink.flush(timeout=2)
    assert time.monotonic() - started < 8
    _back_to_redis(sink)


def _back_to_redis(sink: Publisher) -> None:
    """Point a publisher holding rounds at the session's Redis and let it send them (its thread
    would otherwise go on trying a port a later test may be given)."""
    sink._client = redis.Redis.from_url(redis_url())
    assert sink.flush(timeout=30)


def test_a_round_redis_did_not_take_is_sent_again_once_it_is_back(monkeypatch) -> None:
    """Found in review: after a failed round (a failover's READONLY, an outage past the client's own
    retries) the round and every event of the next 5 s were dropped: each reader saw a delta number
    skip and showed no more live text of that reply. The round is kept and sent again after the
    pause, with what was queued meanwhile."""
    from redis.exceptions import ReadOnlyError

    monkeypatch.setattr(streaming.publisher, "_PAUSE_S", 0.3)
    client = redis.Redis.from_url(redis_url())
    refusals = [3]  # the first round's three tries are answered READONLY, as a demoted primary does
    pipeline = client.pipeline

    def demoted_then_promoted(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        if refusals[0]:
            refusals[0] -= 1

            def refuse() -> None:
                raise ReadOnlyError("You can't write against a read only replica.")

            pipe.execute = refuse
        return pipe

    monkeypatch.setattr(client, "pipeline", demoted_then_promoted)
    sink = Publisher(client)
    turn_id, claim = uuid.uuid4(), uuid.uuid4()
    sink.delta(turn_id, claim, "Well ")
    assert sink.flush(timeout=10)
    sink.delta(turn_id, claim, "met.")
    assert sink.flush(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(client.xrange(stream_key(turn_id))) < 2:
        time.sleep(0.05)
    entries = client.xrange(stream_key(turn_id))
    assert [(f[b"seq"], f[b"text"]) for _, f in entries] == [(b"1", b"Well "), (b"2", b"met.")]


def test_the_publisher_gives_up_on_a_redis_that_never_answers(monkeypatch) -> None:
    hung = socket.socket()  # accepts connections (the backlog) and never says a word
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        monkeypatch.setattr(streaming.publisher, "_publisher", None)
        monkeypatch.setattr(
            streaming.publisher, "redis_url", lambda: f"redis://127.0.0.1:{hung.getsockname()[1]}"
        )
        sink = publisher()
        sink.delta(uuid.uuid4(), uuid.uuid4(), "hello")
        started = time.monotonic()
        assert not sink.flush(timeout=5)  # held for Redis to come back: flush says so, in bounded time
        assert time.monotonic() - started < 10
    finally:
        hung.close()
    _back_to_redis(sink)


def _failed_over_front(primary: dict[str, Any]) -> tuple[socket.socket, list[int]]:
    """A Redis address whose first connection reaches a demoted server (every command answered
    READONLY, as a primary a failover turned into a replica answers writes) and whose later ones reach
    `primary` (redis-py's connection kwargs: a host and port, or a unix socket's path; the name now
    points at the new primary). Returns the listener and its connections."""
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(16)
    accepted: list[int] = []

    def demoted(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                lines, at, commands = data.split(b"\r\n"), 0, 0
                while at < len(lines) and lines[at].startswith(
                    b"*"
                ):  # each command: *n, then n $len/arg pairs
                    at, commands = at + 1 + 2 * int(lines[at][1:]), commands + 1
                conn.sendall(b"-READONLY You can't write against a read only replica.\r\n" * commands)

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with source, sink:
            while data := source.recv(65536):
                sink.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = front.accept()
            except OSError:
                return
            accepted.append(1)
            if len(accepted) == 1:
                threading.Thread(target=demoted, args=(conn,), daemon=True).start()
            else:
                if "path" in primary:
                    upstream = socket.socket(socket.AF_UNIX)
                    upstream.connect(primary["path"])
                else:
                    upstream = socket.create_connection(
                        (primary.get("host", "127.0.0.1"), int(primary["port"]))
                    )
                threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return front, accepted


def test_the_publisher_reconnects_after_a_failover_demoted_its_server() -> None:
    """Found in review (Redis as a store): redis-py keeps a connection that answers READONLY (only its
    Sentinel mode drops one), so after a failover that moved the name to the new primary every round
    of stream events failed, paused 5 s, and failed again until the worker restarted: no streamed
    turn of that worker showed text. The publisher drops its connections on READONLY."""
    primary = redis.Redis.from_url(redis_url())
    front, accepted = _failed_over_front(primary.connection_pool.connection_kwargs)
    try:
        port = front.getsockname()[1]
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
        sink = Publisher(client)
        turn_id, claim = uuid.uuid4(), uuid.uuid4()
        sink.delta(turn_id, claim, "after the failover")
        assert sink.flush(timeout=15)
        assert len(accepted) >= 2  # connected anew, past the demoted server
        assert [f[b"text"] for _, f in primary.xrange(stream_key(turn_id))] == [b"after the failover"]
    finally:
        front.close()


def test_concurrent_first_calls_start_one_publisher(monkeypatch) -> None:
    monkeypatch.setattr(streaming.publisher, "_publisher", None)
    barrier, got = threading.Barrier(16), []

    def first_call() -> None:
        barrier.wait()
        got.append(publisher())

    threads = [threading.Thread(target=first_call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(p) for p in got}) == 1


# --- bounds ---------------------------------------------------------------------------------------


def test_a_stream_of_a_turn_that_never_runs_ends_at_its_longest_life(monkeypatch) -> None:
    monkeypatch.setattr(settings, "stream_max_s", 1.0)
    monkeypatch.setattr(settings, "stream_check_s", 0.0001)  # XREAD's block rounds to at least 1 ms
    turn_id = _turn()
    started = time.monotonic()
    events = _read(turn_id)
    assert _codes(events) == ["timeout"] and events[0].data["status"] == "queued"
    assert 1.0 <= time.monotonic() - started < 10


def test_last_event_ids_beyond_redis_range_are_refused() -> None:
    assert valid_event_id("18446744073709551615-18446744073709551615") and valid_event_id("final")
    assert not valid_event_id("18446744073709551616-0") and not valid_event_id("1-0\n")


def test_an_out_of_range_last_event_id_is_a_422_naming_it(base_url) -> None:
    url = f"{base_url}/v1/turns/{_turn()}/stream"
    r = httpx.get(
        url, headers={"X-API-Key": INGEST_KEY, "Last-Event-ID": "99999999999999999999-0"}, timeout=10
    )
    assert r.status_code == 422 and "Last-Event-ID" in r.text, r.text
    # found in review: this 422 had its own shape and echoed the header back; it is every 422's
    assert r.json()["detail"][0]["field"] == "Last-Event-ID (header)", r.text
    assert "99999999999999999999" not in r.text


def test_a_database_blip_is_ridden_out_and_an_outage_ends_readers_with_a_resumable_error(monkeypatch) -> None:
    """Found in review: three failed status checks, which three readers joining within a second of
    a blip could cause, failed every reader of the process with an exception (a traceback, the
    connection cut with no last event, chat clients raising)."""
    from sqlalchemy.exc import OperationalError

    import streaming.hub

    monkeypatch.setattr(settings, "stream_check_s", 0.05)
    real = streaming.hub._finished
    blip_until = time.monotonic() + 1.0

    def flaky(turn_ids):  # type: ignore[no-untyped-def]
        if time.monotonic() < blip_until:
            raise OperationalError("SELECT", {}, Exception("the database restarts"))
        return real(turn_ids)

    monkeypatch.setattr(streaming.hub, "_finished", flaky)
    request = TurnRequest(**new_conversation(), message="Tell me of the road.")
    (stored,) = producer.submit_turns([request], send=False, api_key="game-a", tenant="game-a")
    _answered(stored.id, "The road is long.")
    assert _codes(_read(stored.id)) == ["The road is long.", "done"]  # about 20 checks failed first

    monkeypatch.setattr(streaming.hub, "_STATUS_OUTAGE_S", 0.3)
    blip_until = time.monotonic() + 3600  # an outage
    events = _read(stored.id)
    assert [(e.kind, e.id, e.data.get("code")) for e in events] == [("error", None, "unavailable")]


def test_a_blip_the_hub_saw_while_readers_left_does_not_count_against_a_check_long_after(monkeypatch) -> None:
    """Found in review: the status checks' failures were cleared only by a check that succeeded; a
    blip its readers left before one did stayed counted, so one failed check hours later ended every
    reader of the process at once (each `unavailable`)."""
    from sqlalchemy.exc import OperationalError

    import streaming.hub
    from streaming.hub import STREAM_HUB_FAILURES

    monkeypatch.setattr(settings, "stream_check_s", 0.05)
    monkeypatch.setattr(streaming.hub, "_STATUS_OUTAGE_S", 5.0)
    real = streaming.hub._finished
    failing = {"left": 10**6}  # the blip: every check fails

    def flaky(turn_ids):  # type: ignore[no-untyped-def]
        if failing["left"] > 0:
            failing["left"] -= 1
            raise OperationalError("SELECT", {}, Exception("the database restarts"))
        return real(turn_ids)

    monkeypatch.setattr(streaming.hub, "_finished", flaky)
    first, second = _turn(), _turn()
    failed = STREAM_HUB_FAILURES.labels("status")

    async def read_turn(turn_id: uuid.UUID) -> TurnView:
        view = producer.get_turn(turn_id)
        assert view is not None
        return view

    async def collect(turn_id: uuid.UUID) -> list[Event]:
        return [e async for e in turn_events(turn_id, lambda: read_turn(turn_id))]

    def ended(turn_id: uuid.UUID) -> None:
        _cancel(turn_id)
        _end(turn_id)

    async def both() -> tuple[list[Event], list[Event]]:
        before = failed._value.get()
        reading = asyncio.create_task(collect(first))
        while failed._value.get() - before < 3:  # three checks failed while it read
            await asyncio.sleep(0.01)
        await asyncio.to_thread(ended, first)
        during = await reading
        await asyncio.sleep(0.5)  # the hub idle; its blip over, unseen by any check
        monkeypatch.setattr(streaming.hub, "_STATUS_OUTAGE_S", 0.3)
        failing["left"] = 1  # one failed check, long after
        reading = asyncio.create_task(collect(second))
        await asyncio.sleep(0.6)
        await asyncio.to_thread(ended, second)
        return during, await reading

    during, after = asyncio.run(asyncio.wait_for(both(), 20))
    assert _codes(during) == ["cancelled"]
    assert failing["left"] == 0 and _codes(after) == ["cancelled"]  # the one failure ridden out


def test_an_entry_that_does_not_parse_is_read_past_once_not_every_round() -> None:
    """Found in review: the hub skipped an entry it could not parse, but the follower's cursor
    stayed before it, so while it was the stream's newest every XREAD returned it at once: a tight
    loop of reads (and a warning each) for the whole process; a resume over it was a 500."""
    from streaming.hub import STREAM_HUB_READS

    turn_id = _turn()
    claim = str(uuid.uuid4())
    ids = _xadd(turn_id, (claim, "Well", 1))
    redis.Redis.from_url(redis_url()).xadd(
        stream_key(turn_id), {"kind": DELTA, "text": " met", "claim": claim, "seq": "2", "t": "not a time"}
    )

    def later() -> None:
        time.sleep(1.5)
        _xadd(turn_id, (claim, ".", 3))
        _cancel(turn_id)
        _end(turn_id)

    reads_before = STREAM_HUB_READS._value.get()
    threading.Thread(target=later, daemon=True).start()
    events = _read(turn_id)
    reads = STREAM_HUB_READS._value.get() - reads_before
    assert _codes(events) == ["Well", "cancelled"]  # the unreadable delta leaves a gap: no more shown
    assert reads < 50, reads  # about one blocking read a second, not a spin
    assert _codes(_read(turn_id, last_event_id=ids[0])) == ["cancelled"]  # a resume over it


@pytest.mark.parametrize("events_sent, blocked_at", [(1000, 2), (1, 3)], ids=["an-event", "the-close"])
def test_a_reader_that_stops_reading_ends_its_stream_instead_of_holding_it_for_ever(
    monkeypatch, events_sent, blocked_at
) -> None:
    """Found in review: the SSE responses had no send timeout, so a reader keeping its connection
    open with a zero receive window blocked the send for as long as it liked; the stream's deadline
    and disconnect checks never ran. Here the ASGI send blocks from message `blocked_at` on (the
    headers are the first; with one event, the third is the closing send, which sse-starlette's own
    timeout does not cover)."""
    import anyio

    from api import sse

    monkeypatch.setattr(sse, "SEND_TIMEOUT_S", 0.5)

    async def events():  # type: ignore[no-untyped-def]
        for i in range(events_sent):
            yield {"data": str(i)}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) >= blocked_at:
            await anyio.sleep(3600)  # the reader stopped reading

    async def receive() -> dict:
        await anyio.sleep(3600)
        return {"type": "http.disconnect"}

    async def serve() -> str:
        scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
        with anyio.fail_after(15):
            try:
                await sse.sse_response(events())(scope, receive, send)
            except Exception as exc:  # the review: it ended, but as a traceback in the server's log
                return type(exc).__name__
        return "returned"

    assert anyio.run(serve) == "returned"
    assert len(sent) == blocked_at


def test_a_stream_served_through_the_apps_middleware_ends_when_its_reader_stops_reading(
    world, monkeypatch
) -> None:
    """Found in review: the request counter was Starlette's BaseHTTPMiddleware, which relays a
    streamed response through a memory stream of its own: the stream's bounded send reached only that
    relay, and the relay's write to a reader that stopped reading held the connection for good. The
    whole app now: the blocked send is the one the bound cancels."""
    import anyio

    from api import sse
    from api.main import create_app

    monkeypatch.setattr(sse, "SEND_TIMEOUT_S", 0.5)
    app = create_app()

    async def events():  # type: ignore[no-untyped-def]
        for i in range(1000):
            yield {"data": str(i)}

    @app.get("/v1/stream-for-the-test")
    async def stream() -> Any:
        return sse.sse_response(events())

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) >= 2:
            await anyio.sleep(3600)  # the reader stopped reading

    async def receive() -> dict:
        await anyio.sleep(3600)
        return {"type": "http.disconnect"}

    async def serve() -> str:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/v1/stream-for-the-test",
            "raw_path": b"/v1/stream-for-the-test",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        with anyio.move_on_after(15):
            await app(scope, receive, send)
            return "returned"
        return "still held after 15 s"

    assert anyio.run(serve) == "returned"
    assert sent[0]["status"] == 200 and len(sent) == 2


def test_a_reader_of_an_unfinished_turn_ends_when_the_hub_closes_not_at_its_deadline() -> None:
    """Found in review: the hub's close failed its readers over to the stored turn, which then
    waited for a status check that nothing would run any more: until the stream's 15 minutes."""
    from streaming.hub import close_hub

    turn_id = _turn()  # queued, never answered

    async def read_turn() -> TurnView:
        view = producer.get_turn(turn_id)
        assert view is not None
        return view

    async def follow_then_close() -> tuple[list[list[Event]], float]:
        # One reader follows the stream; one resumed after `final` follows the stored turn alone (a
        # review of the fix: its inner wait went on to the deadline).
        outs: list[list[Event]] = [[], []]

        async def follow(out: list[Event], last_event_id: str | None) -> None:
            async for event in turn_events(turn_id, read_turn, last_event_id=last_event_id):
                out.append(event)

        tasks = [asyncio.create_task(follow(outs[0], None)), asyncio.create_task(follow(outs[1], "final"))]
        await asyncio.sleep(0.5)  # following now
        started = time.monotonic()
        await close_hub()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return outs, time.monotonic() - started

    (streamed, stored), took = asyncio.run(follow_then_close())
    assert _codes(streamed) == _codes(stored) == ["unavailable"] and took < 5


def test_a_round_of_stream_events_cut_off_mid_send_leaves_no_stream_without_an_expiry() -> None:
    """Found in review: a round of events went out as a non-transactional pipeline, every XADD first
    and the EXPIREs last. redis-py sends a long pipeline in chunks that Redis runs as they come, so a
    connection cut after the first chunk created the stream with no expiry; a turn that then ended
    (or whose worker died) before another round got through left it in Redis for good."""
    from redis.backoff import NoBackoff
    from redis.connection import Connection, UnixDomainSocketConnection
    from redis.retry import Retry

    cut = [False]
    base = UnixDomainSocketConnection if redis_url().startswith("unix") else Connection

    class CutOff(base):  # type: ignore[valid-type,misc]
        """This client's connections alone: a long command's first chunk reaches Redis, then the
        connection goes (while `cut`)."""

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            chunks = [command] if isinstance(command, (bytes, str)) else list(command)
            if cut[0] and len(chunks) > 1:
                super().send_packed_command(chunks[:1], check_health)
                self.disconnect()
                raise redis.ConnectionError("cut off mid-send")
            super().send_packed_command(command, check_health)

    client = redis.Redis.from_url(redis_url(), retry=Retry(NoBackoff(), 0), connection_class=CutOff)
    sink = Publisher(client)
    turn_id, claim = uuid.uuid4(), uuid.uuid4()
    events = [
        (
            stream_key(turn_id),
            {"kind": DELTA, "text": f"word {i} of a long reply ", "claim": str(claim), "seq": str(i + 1)},
        )
        for i in range(200)
    ]
    cut[0] = True
    assert (
        sink._send(events) == "held"
    )  # one long round, as the publisher's thread sends it; kept to try again
    cut[0] = False
    assert redis.Redis.from_url(redis_url()).ttl(stream_key(turn_id)) != -1  # -2 (none), never -1 (no expiry)
