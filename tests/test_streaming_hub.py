"""The API process's one hub for all SSE readers (streaming/hub.py), with real Redis and PostgreSQL:
each reader gets exactly its events, a reader that hangs up is let go, a slow reader stalls nobody
and loses nothing, one status query a check interval serves every reader, and a Redis failure is
survived."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import Engine, event

import streaming.hub
from core.settings import settings
from db.session import session_scope
from db.turns import cancel_turns, finished_turns
from services import producer
from services.producer import TurnView
from services.schemas import TurnRequest
from streaming.events import DELTA, END, redis_url, stream_key
from streaming.hub import Hub, hub
from streaming.reader import Event, TurnReader, _client, turn_events
from tests.conftest import new_conversation

pytestmark = pytest.mark.usefixtures("world")


def _turn() -> uuid.UUID:
    """A streamed turn, stored but never sent to a worker."""
    request = TurnRequest(**new_conversation(), message="Tell me of the road.", stream=True)
    (stored,) = producer.submit_turns([request], send=False, api_key="game-a", tenant="game-a")
    return stored.id


def _cancel(*turn_ids: uuid.UUID) -> None:
    with session_scope() as session:
        cancel_turns(session=session, turn_ids=list(turn_ids))


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _xadd(turn_id: uuid.UUID, claim: str, *texts: str, first_seq: int = 1) -> list[str]:
    client = redis.Redis.from_url(redis_url())
    return [
        client.xadd(
            stream_key(turn_id), {"kind": DELTA, "text": t, "claim": claim, "seq": str(first_seq + i)}
        ).decode()
        for i, t in enumerate(texts)
    ]


def _end(turn_id: uuid.UUID) -> None:
    redis.Redis.from_url(redis_url()).xadd(stream_key(turn_id), {"kind": END})


def _stored(turn_id: uuid.UUID) -> Callable[[], Awaitable[TurnView]]:
    async def read_turn() -> TurnView:
        view = await asyncio.to_thread(producer.get_turn, turn_id)
        assert view is not None
        return view

    return read_turn


async def _follow(turn_id: uuid.UUID) -> list[Event]:
    return [e async for e in turn_events(turn_id, _stored(turn_id))]


def _codes(events: list[Event]) -> list[str]:
    return [e.data["text"] if e.kind == "delta" else e.data.get("code", e.kind) for e in events]


async def _until(check: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def test_many_readers_of_many_turns_each_get_exactly_their_turns_events() -> None:
    turns = [_turn() for _ in range(12)]
    claims = {t: str(uuid.uuid4()) for t in turns}
    for i, turn_id in enumerate(turns):
        _xadd(turn_id, claims[turn_id], f"{i}:a", f"{i}:b")  # before the readers come

    async def crowd() -> list[list[Event]]:
        readers = [asyncio.create_task(_follow(t)) for t in turns for _ in range(2)]  # two a turn
        await _until(lambda: hub(_client).followers() == len(readers))
        for i, turn_id in enumerate(turns):  # while they follow
            _xadd(turn_id, claims[turn_id], f"{i}:c", f"{i}:d", first_seq=3)
        _cancel(*turns)
        for turn_id in turns:
            _end(turn_id)
        return await asyncio.wait_for(asyncio.gather(*readers), 20)

    seen = asyncio.run(crowd())
    for n, events in enumerate(seen):
        i = n // 2
        assert _codes(events) == [f"{i}:a", f"{i}:b", f"{i}:c", f"{i}:d", "cancelled"]


def test_a_reader_that_hangs_up_is_let_go() -> None:
    turn_id = _turn()
    _xadd(turn_id, str(uuid.uuid4()), "Well", " met")

    async def hang_up() -> tuple[int, int]:
        reader = TurnReader(turn_id, _stored(turn_id))
        await reader.open()
        events = reader.events()
        first = await anext(events)
        assert first.data["text"] == "Well"
        readers = hub(_client)
        following, gauge = readers.followers(), _sample("mlchat_stream_readers")
        await events.aclose()  # what the SSE response does when the client goes away
        assert _sample("mlchat_stream_readers") == gauge - 1  # the metric follows the reader out
        return following, readers.followers()

    assert asyncio.run(hang_up()) == (1, 0)


def test_a_slow_reader_stalls_no_one_and_loses_nothing(monkeypatch) -> None:
    monkeypatch.setattr(streaming.hub, "BACKLOG", 8)
    slow_turn, fast_turn = _turn(), _turn()
    slow_claim, fast_claim = str(uuid.uuid4()), str(uuid.uuid4())

    async def race() -> tuple[list[str], list[str], int, list[str], list[str]]:
        readers = hub(_client)
        slow = readers.follow(slow_turn, stream_key(slow_turn))  # never takes until the fast one is done
        fast = readers.follow(fast_turn, stream_key(fast_turn))
        written = _xadd(slow_turn, slow_claim, *(f"s{i}" for i in range(50)))
        fast_ids = _xadd(fast_turn, fast_claim, *(f"f{i}" for i in range(50)))
        got: list[str] = []
        async with asyncio.timeout(10):
            while len(got) < len(fast_ids):
                await fast.wait(1)
                got += [e.id for e in fast.take()]
        held = slow.take()  # what the hub had handed the slow one meanwhile: no more than its backlog
        slow_got = [e.id for e in held]
        async with asyncio.timeout(10):
            while len(slow_got) < len(written):
                await slow.wait(1)
                slow_got += [e.id for e in slow.take()]
        return got, fast_ids, len(held), slow_got, written

    got, fast_ids, held, slow_got, written = asyncio.run(race())
    assert got == fast_ids  # all of it while the slow one took nothing
    assert 0 < held <= 8
    assert slow_got == written  # every entry, in order, once


def test_one_status_query_a_check_interval_serves_every_reader(monkeypatch) -> None:
    monkeypatch.setattr(settings, "stream_check_s", 0.2)
    turns = [_turn() for _ in range(20)]
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        # Reads of turns only: this session's worker and its housekeeping query the same database
        # (one of theirs, a read of another turn by its key, was counted once on a loaded clone); a
        # read of one of these turns by its key is a reader's own, and counts.
        plain = " ".join(statement.split())
        key = parameters.get("pk_1") if isinstance(parameters, dict) else None
        others = "WHERE turns.id = %(pk_1)s" in plain and key not in turns
        if plain.startswith("SELECT") and "FROM turns" in plain and " FOR " not in plain and not others:
            statements.append(plain)

    async def crowd() -> tuple[int, list[list[Event]]]:
        readers = [asyncio.create_task(_follow(t)) for t in turns]
        await _until(lambda: hub(_client).followers() == len(turns))
        await asyncio.sleep(0.3)  # the joins' first checks are done
        event.listen(Engine, "before_cursor_execute", count)
        try:
            await asyncio.sleep(1.0)  # five check intervals, no turn finished
        finally:
            event.remove(Engine, "before_cursor_execute", count)
        during = len(statements)
        _cancel(*turns)
        return during, await asyncio.wait_for(asyncio.gather(*readers), 20)

    during, seen = asyncio.run(crowd())
    # About one a 0.2 s interval, not one a reader (20 readers: 100 in the window). A loaded clone
    # counted 11 once (late joins' first checks, and a worker's read by key): room for that.
    assert 3 <= during <= 12, statements
    assert all(_codes(events) == ["cancelled"] for events in seen)


def test_the_status_query_is_one_statement_whatever_the_number_of_readers() -> None:
    turns = [_turn() for _ in range(3)]
    _cancel(turns[0])
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        with session_scope() as session:
            one = finished_turns(session=session, turn_ids=turns[:1])
            three = finished_turns(session=session, turn_ids=turns)
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    assert one == three == {turns[0]}
    ours = [s for s in statements if "FROM turns" in s]
    assert len(ours) == 2 and ours[0] == ours[1], ours  # prepared once, whatever the count
    _cancel(*turns[1:])


def test_the_status_check_answers_while_the_request_pool_is_held_by_slow_work() -> None:
    """Overload review: the readers' status check took its connection from the request pool; with
    every connection held by slow work it waited out the pool's timeout (30 s) three times, and then
    ended every stream of the process as "unavailable". It has a connection of its own."""
    import threading

    from db.session import get_engine

    turn_id = _turn()
    engine = get_engine()
    held = [engine.connect() for _ in range(10 - engine.pool.checkedout())]  # pool_size 5 + overflow 5
    answers: list[set[uuid.UUID]] = []
    try:
        check = threading.Thread(
            target=lambda: answers.append(streaming.hub._finished({turn_id})), daemon=True
        )
        check.start()
        check.join(10)
    finally:
        for conn in held:
            conn.close()
    assert answers == [set()]
    _cancel(turn_id)


def _closed_port_client() -> Any:
    import redis.asyncio as aioredis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once it is closed
    return aioredis.Redis.from_url(url, socket_connect_timeout=1, retry=None)


def test_a_reader_reads_through_a_redis_blip_from_where_it_was() -> None:
    """Found in review: one failed read (a restart, a failover's READONLY or UNBLOCKED) sent every
    reader of the API process to its stored turn for good: each reply in progress stopped mid-line
    and came whole at its end. The readers keep their places through a blip; the next connection
    reads on from them."""
    turn_id = _turn()
    ids = _xadd(turn_id, str(uuid.uuid4()), "Well", " met")
    connects = [_closed_port_client, _client]

    async def through() -> tuple[bool, list[str]]:
        readers = Hub(lambda: connects.pop(0)())
        follower = readers.follow(turn_id, stream_key(turn_id))
        got = await _take_ids(follower, 2)
        unreadable = follower.unreadable  # before the close, which ends every follower
        await readers.close()
        return unreadable, got

    failed = _sample("mlchat_stream_hub_failures_total", part="read")
    reads = _sample("mlchat_stream_hub_reads_total")
    assert asyncio.run(through()) == (False, ids)
    assert _sample("mlchat_stream_hub_failures_total", part="read") >= failed + 1
    assert _sample("mlchat_stream_hub_reads_total") >= reads + 1


def test_readers_whose_redis_stays_away_follow_their_stored_turns(monkeypatch) -> None:
    monkeypatch.setattr(streaming.hub, "_READ_OUTAGE_S", 1.0)
    turn_id = _turn()

    async def away() -> tuple[bool, float]:
        readers = Hub(_closed_port_client)
        follower = readers.follow(turn_id, stream_key(turn_id))
        started = time.monotonic()
        await _until(lambda: follower.unreadable)
        waited = time.monotonic() - started
        await readers.close()
        return follower.unreadable, waited

    unreadable, waited = asyncio.run(away())
    assert unreadable and waited >= 0.9  # not at the first failed read: after the outage lasted


def test_an_outage_the_hub_met_before_it_went_idle_does_not_cut_the_next_readers_short(monkeypatch) -> None:
    """Found in review: the outage's clock kept running while no one read; the next reader, minutes
    later, was sent to its stored turn at its first failed read."""
    monkeypatch.setattr(streaming.hub, "_READ_OUTAGE_S", 1.0)
    turn_id = _turn()
    ids = _xadd(turn_id, str(uuid.uuid4()), "Well", " met")
    failed = _sample("mlchat_stream_hub_failures_total", part="read")
    connects: list[Callable[[], Any]] = []  # the closed port until the second reader's first read

    def connect() -> Any:
        return connects.pop(0)() if connects else _closed_port_client()

    async def later() -> tuple[bool, list[str]]:
        readers = Hub(connect)
        first = readers.follow(turn_id, stream_key(turn_id))
        await _until(lambda: _sample("mlchat_stream_hub_failures_total", part="read") > failed)  # it failed
        readers.unfollow(first)
        await asyncio.sleep(1.5)  # idle past the outage's length
        connects.extend([_closed_port_client, _client])  # a blip: one failed read, then Redis is back
        second = readers.follow(turn_id, stream_key(turn_id))
        got = await _take_ids(second, 2)
        unreadable = second.unreadable
        await readers.close()
        return unreadable, got

    assert asyncio.run(later()) == (False, ids)


def test_the_hub_stops_with_the_app() -> None:
    from api.main import create_app

    app = create_app()

    async def serve_and_stop() -> tuple[bool, bool]:
        async with app.router.lifespan_context(app):
            readers = hub(_client)
            follower = readers.follow(_turn(), stream_key(uuid.uuid4()))
            await asyncio.sleep(0.2)  # its XREAD is blocked
        stopped = all(task.done() for task in readers._tasks) and readers._client is None
        return stopped, follower.unreadable, hub(_client) is not readers

    # Its loops are stopped and its connection closed; a reader still following ends from the
    # stored turn instead of waiting for its deadline.
    assert asyncio.run(serve_and_stop()) == (True, True, True)


async def _take_ids(follower: streaming.hub.Follower, n: int, got: list[str] | None = None) -> list[str]:
    got = [] if got is None else got
    async with asyncio.timeout(10):
        while len(got) < n:
            await follower.wait(1)
            got += [e.id for e in follower.take()]
    return got


def test_a_reader_joining_while_a_read_waits_gets_the_whole_stream() -> None:
    turn_id, claim = uuid.uuid4(), str(uuid.uuid4())
    early = _xadd(turn_id, claim, "a", "b", "c")

    async def go() -> list[str]:
        readers = Hub(_client)
        first = readers.follow(turn_id, stream_key(turn_id))
        await _take_ids(first, 3)
        await asyncio.sleep(0.1)  # the hub's XREAD now waits from the first reader's cursor
        second = readers.follow(turn_id, stream_key(turn_id))  # a second reader, from the start
        late = _xadd(turn_id, claim, "d", first_seq=4)
        got = await _take_ids(second, 4)
        await readers.close()
        return got == early + late

    assert asyncio.run(go())  # before: it got only "d"


def test_a_slow_reader_of_a_shared_turn_let_go_while_a_read_waits_loses_nothing(monkeypatch) -> None:
    monkeypatch.setattr(streaming.hub, "BACKLOG", 4)
    turn_id, claim = uuid.uuid4(), str(uuid.uuid4())

    async def go() -> bool:
        readers = Hub(_client)
        slow = readers.follow(turn_id, stream_key(turn_id))
        fast = readers.follow(turn_id, stream_key(turn_id))
        written = _xadd(turn_id, claim, *[f"x{i}" for i in range(12)])
        await _take_ids(fast, 12)
        await asyncio.sleep(0.1)  # an XREAD waits from the fast reader's cursor; the slow one holds 4
        got = [e.id for e in slow.take()]  # taken: the slow reader is read for again
        written += _xadd(turn_id, claim, "y", first_seq=13)
        got = await _take_ids(slow, 13, got)
        await readers.close()
        return got == written

    assert asyncio.run(go())  # before: 8 of its 13 entries were lost


def test_an_entry_that_does_not_parse_stops_no_one() -> None:
    bad, good = uuid.uuid4(), uuid.uuid4()
    client = redis.Redis.from_url(redis_url())

    async def go() -> tuple[list[str], list[str]]:
        readers = Hub(_client)
        first = readers.follow(bad, stream_key(bad))
        await asyncio.sleep(0.1)
        client.xadd(stream_key(bad), {"kind": DELTA, "text": "x", "claim": "c", "t": "not-a-float"})
        fine = _xadd(bad, "c", "after", first_seq=2)
        await asyncio.sleep(0.3)
        second = readers.follow(good, stream_key(good))
        written = _xadd(good, "c", "y")
        got_second = await _take_ids(second, 1)
        got_first = await _take_ids(first, 1)
        await readers.close()
        return got_first + got_second, fine + written

    got, expected = asyncio.run(go())
    assert got == expected  # before: the hub's read task died and no later reader got a delta


def test_a_status_check_that_fails_once_ends_no_reader(monkeypatch) -> None:
    turn_id = _turn()
    calls = []

    def flaky(turn_ids: set[uuid.UUID]) -> set[uuid.UUID]:
        calls.append(len(turn_ids))
        if len(calls) == 1:
            raise OSError("the pool timed out")
        return set()

    monkeypatch.setattr(streaming.hub, "_finished", flaky)
    monkeypatch.setattr(settings, "stream_check_s", 0.1)

    async def go() -> list[str]:
        readers = Hub(_client)
        follower = readers.follow(turn_id, stream_key(turn_id))
        await asyncio.sleep(0.5)
        written = _xadd(turn_id, "c", "still here")
        got = await _take_ids(follower, 1)  # take() would raise the stored failure
        await readers.close()
        return got == written

    failed = _sample("mlchat_stream_hub_failures_total", part="status")
    try:
        assert asyncio.run(go())
        assert len(calls) >= 3  # checked again after the failure
        assert _sample("mlchat_stream_hub_failures_total", part="status") == failed + 1
    finally:
        _cancel(turn_id)
