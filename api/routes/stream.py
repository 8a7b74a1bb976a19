"""A turn's reply as Server-Sent Events: GET /v1/turns/{id}/stream (streaming/reader.py says what
comes, in which order)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, needs
from api.routes.turns import visible_turn
from api.sse import event_json, sse_response
from services.producer import TurnView
from streaming.reader import TurnReader, unavailable, valid_event_id

router = APIRouter(prefix="/v1/turns", tags=["turns"])


@router.get("/{turn_id}/stream", response_class=EventSourceResponse)
async def stream_turn(
    turn_id: uuid.UUID,
    who: Annotated[Caller, Depends(needs("ingest"))],
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> EventSourceResponse:
    """`delta` events as the reply is written, then `done` (the stored turn) or `error`; resumes
    after `Last-Event-ID`; another key's turn or an unknown one is 404."""
    await run_in_threadpool(visible_turn, turn_id, who)
    if last_event_id is not None and not valid_event_id(last_event_id):
        # The shape of every other 422 (the field named, the input not echoed back).
        loc = ("header", "Last-Event-ID")
        msg = "not an id of this stream (a Redis stream id, each part at most 2^64-1, or 'final')"
        raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg}])

    async def read() -> TurnView:
        return await run_in_threadpool(visible_turn, turn_id, who)

    reader = TurnReader(turn_id, read, last_event_id=last_event_id)
    await reader.open()  # the resume's read, before the 200: nothing of it can fail the stream itself

    async def frames():  # type: ignore[no-untyped-def]
        async for event in reader.events():
            frame = {"event": event.kind, "data": event_json(event.data)}
            yield frame if event.id is None else frame | {"id": event.id}

    ending = unavailable()  # resumable: the turn goes on while this API process restarts
    farewell = {"event": ending.kind, "data": event_json(ending.data)}
    return sse_response(frames(), on_shutdown=farewell)
