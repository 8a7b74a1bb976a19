"""The API's answers are the caller's alone: never stored by a shared cache, never sniffed.

A batch's output file (`GET /v1/files/{id}/content`) went out with `Last-Modified` and an `ETag` but
no `Cache-Control`: a CDN or proxy in front could keep it heuristically and answer a later request
for the same URL without a key (`X-API-Key` is not `Authorization`, which shared caches honour by
rule). Every `/v1/` answer that sets neither gets `Cache-Control: private, no-store` and
`X-Content-Type-Options: nosniff` (review of the API's web security).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PRIVATE = {"cache-control": "private, no-store", "x-content-type-options": "nosniff"}


class PrivateResponses:
    """A plain ASGI middleware (see api/request_count.py for why not BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in PRIVATE.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, sending)
