"""Reject request bodies over a size limit with a 413, however they are sent.

A declared Content-Length over the limit is refused before anything is read. A body without one
(chunked transfer encoding) is read here, up to the limit, before the app sees any of it, and
replayed to the app; one byte over and the answer is 413 too. (Raising from inside the app's own
read would surface as FastAPI's 400 "error parsing the body".) A path may have its own limit (card
uploads are larger than JSON requests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

Scope = dict[str, Any]


class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length, or the bytes actually streamed, exceed the limit."""

    def __init__(self, app: Any, max_bytes: int, per_path: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                await self._reply(send, 400, "Content-Length is not a number")
                return
            if too_large:
                await self._reply(send, 413, f"request body over {limit} bytes")
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message]), send)
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > limit:
                await self._reply(send, 413, f"request body over {limit} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], then=receive), send)

    async def _reply(self, send: Any, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[dict[str, Any]], then: Any = None) -> Any:
    """A receive() that hands out `messages`, then defers to `then` (for the disconnect)."""
    pending = list(messages)

    async def receive() -> Any:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
