"""A stream open while the API process shuts down ends with its resumable farewell, not a bare end of
body that a chat client reads as a whole reply."""

from __future__ import annotations

import asyncio
from typing import Any

from sse_starlette.sse import AppStatus

from api.sse import sse_response


def test_a_stream_open_at_shutdown_ends_with_its_farewell_frame() -> None:
    """Found in review: on SIGTERM sse-starlette cancelled the stream and ended its body cleanly, so an
    `openai` client took a half-written reply for a whole one (no error, no [DONE])."""
    sent: list[dict[str, Any]] = []
    closed: list[str] = []

    async def events():  # type: ignore[no-untyped-def]
        try:
            yield {"data": "first"}
            await asyncio.Event().wait()  # a turn that is still being written
        finally:
            closed.append("events")

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays connected
        return {}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if b"first" in message.get("body", b""):
            AppStatus.should_exit = True  # uvicorn's SIGTERM, as sse-starlette sees it

    async def serve() -> None:
        response = sse_response(events(), on_shutdown={"event": "error", "data": '{"code": "unavailable"}'})
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET", "path": "/", "headers": []}
        await response(scope, receive, send)

    try:
        asyncio.run(asyncio.wait_for(serve(), 20))
    finally:
        AppStatus.should_exit = False
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"data: first" in body and body.rstrip().endswith(b'data: {"code": "unavailable"}'), body
    assert closed == ["events"]  # the stream's own generator was closed (its follower let go)


def test_a_client_gone_while_its_stream_waits_closes_the_stream_at_once() -> None:
    """Review of the farewell above: its wrapper awaited each event in a task of its own and closed
    the stream's generator while that task was still inside it ("aclose(): asynchronous generator is
    already running"): a traceback at each disconnect, and the turn's follower kept until its next
    event (a queued turn's: up to MLCHAT_STREAM_MAX_S)."""
    closed: list[str] = []
    first_sent = asyncio.Event()

    async def events():  # type: ignore[no-untyped-def]
        try:
            yield {"data": "first"}
            await asyncio.Event().wait()  # a turn still queued: no next event for a long time
        finally:
            closed.append("events")

    async def receive() -> dict[str, Any]:
        await first_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if b"first" in message.get("body", b""):
            first_sent.set()

    async def serve() -> None:
        response = sse_response(events(), on_shutdown={"event": "error", "data": "{}"})
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET", "path": "/", "headers": []}
        await response(scope, receive, send)
        assert closed == ["events"]  # closed when the response returned, not at garbage collection

    asyncio.run(asyncio.wait_for(serve(), 10))
