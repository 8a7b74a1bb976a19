"""The API's side: a turn's events for one reader, from its Redis stream and the stored turn.

What a reader gets, in order: `delta` events (new text of the reply, with `t`: when the engine wrote
it, Unix seconds on the worker's clock), then one `done` (the stored
turn: the truth) or one terminal `error` (the turn failed or was cancelled). When a new claim starts
the reply again (the worker died, or the engine refused the request and it is retried), an `error`
with code `restarted` comes first: the text shown so far is to be discarded. After the last
`restarted` (or from the start), the deltas add up to the stored reply exactly: whatever the stream
lacks (a turn that was not streamed, a stream that expired) comes as one last delta before `done`.

Event ids are the Redis stream ids, so a reader resumes with `Last-Event-ID`; the last delta made
up from the stored turn and `done` carry the id `final`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from core.settings import settings
from services.producer import TurnView
from streaming.events import DELTA, END, Entry, redis_url, stream_key

FINAL = "final"
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def valid_event_id(value: str) -> bool:
    """Whether `value` is an id this reader hands out (a stream id, or `final`)."""
    return value == FINAL or bool(_STREAM_ID.match(value))


@dataclass(frozen=True)
class Event:
    """One event for the reader: `delta`, `done` or `error`."""

    kind: str
    id: str
    data: dict[str, Any] = field(default_factory=dict)


def restarted(event_id: str) -> Event:
    return Event(
        "error",
        event_id,
        {"code": "restarted", "message": "the reply is being written again; discard the text shown so far"},
    )


def terminal(view: TurnView) -> Event:
    """The last event of a finished turn: `done` with the stored turn, or an `error`."""
    if view.status.value == "done":
        return Event("done", FINAL, view.model_dump(mode="json"))
    return Event(
        "error",
        FINAL,
        {
            "code": view.error_code or view.status.value,
            "message": view.error or f"the turn was {view.status.value}",
            "status": view.status.value,
        },
    )


async def turn_events(
    turn_id: uuid.UUID, read_turn: Callable[[], Awaitable[TurnView]], *, last_event_id: str | None = None
) -> AsyncIterator[Event]:
    """The turn's events after `last_event_id` (from the start when None), until done or failed."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url())
    key = stream_key(turn_id)
    try:
        if last_event_id == FINAL:  # the reader has everything but the outcome, or has it already
            view = await _wait_finished(read_turn)
            yield terminal(view)
            return
        cursor, claim, shown, end_seen = "0-0", "", "", False
        if last_event_id is not None:  # what the reader was shown already, to continue it exactly
            cursor = last_event_id
            for raw_id, fields in await client.xrange(key, "-", last_event_id):
                entry = Entry.parse(raw_id, fields)
                end_seen = entry.kind == END
                if entry.kind == DELTA:
                    shown = (shown if entry.claim == claim else "") + entry.text
                    claim = entry.claim
        grace_until, next_check, block = None, 0.0, None  # the first read does not wait
        while True:
            answer = await client.xread({key: cursor}, count=256, block=block)
            block = int(min(settings.stream_check_s, 1.0) * 1000)
            for _, entries in answer:
                for raw_id, fields in entries:
                    entry = Entry.parse(raw_id, fields)
                    cursor = entry.id
                    if entry.kind == END:
                        end_seen = True
                    elif entry.kind == DELTA:
                        if claim and entry.claim != claim:
                            yield restarted(entry.id)
                            shown = ""
                        claim = entry.claim
                        shown += entry.text
                        stamp = {} if entry.t is None else {"t": entry.t}
                        yield Event("delta", entry.id, {"text": entry.text} | stamp)
            now = time.monotonic()
            if not (end_seen or now >= next_check):
                continue
            ended, end_seen = end_seen, False
            next_check = now + settings.stream_check_s
            view = await read_turn()
            if not view.finished:
                continue
            if view.params.get("stream") and not ended and grace_until is None:
                grace_until = next_check  # its last deltas may still be on their way: wait for its end
                continue
            if view.status.value == "done" and view.reply is not None:
                if not view.reply.startswith(shown):
                    yield restarted(FINAL)
                    shown = ""
                if view.reply != shown:
                    yield Event("delta", FINAL, {"text": view.reply[len(shown) :]})
            yield terminal(view)
            return
    finally:
        await client.aclose()


async def _wait_finished(read_turn: Callable[[], Awaitable[TurnView]]) -> TurnView:
    from services.turn_wait import await_finished

    return await await_finished(read_turn, float("inf"))
