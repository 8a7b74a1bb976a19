"""Refusals as the README's *HTTP ingest* describes them: a validation 422 names the field at fault
(and the item, in a batch); the others are a text `detail`; an outage is a 503 with Retry-After. On
the routes of OpenAI's API each is in OpenAI's error shape instead (api/openai_errors.py).

Validation errors are rewritten without echoing the input back: an input holding a lone surrogate
could not even be encoded as JSON, and FastAPI's default handler answered such a request with a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from api.deps import has_a_key, unauthorized
from api.openai_errors import openai_path, openai_shaped, route_path
from core.validation import placed
from db.session import DATABASE_OUTAGES, rolled_back_for_a_conflict
from db.turns import IdempotencyConflict
from db.vector_space import EmbedderMismatch
from roleplay.cards import CardError
from services.files import FilesUnwritable
from services.producer import EnqueueError, TurnRejected
from structured.spec import GrammarBusy

logger = logging.getLogger(__name__)


def safe(text: object) -> str:
    """Text that can always be encoded as UTF-8 JSON (lone surrogates become escapes)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def field_name(loc: Sequence[Any]) -> str:
    """("body", "turns", 3, "message") -> "turns[3].message"; ("query", "slug") -> "slug (query)"."""
    where, *path = loc or ("body",)
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    if where == "body":
        return name or "body"
    return f"{name or where} ({where})"


def _problem(code: int, errors: list[dict[str, Any]]) -> JSONResponse:
    summary = "; ".join(f"{e['field']}: {e['msg']}" for e in errors)
    return JSONResponse(status_code=code, content={"detail": errors, "message": summary})


async def _validation(request: Request, exc: RequestValidationError) -> Response:
    errors = [_shown(err) for err in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors) and not await has_a_key(request):
        return await _keyless(request)
    return _problem(status.HTTP_422_UNPROCESSABLE_CONTENT, errors)


async def _keyless(request: Request) -> Response:
    """A body FastAPI parses before any dependency runs (malformed JSON, not UTF-8): a request with
    no valid key is told it has none (401), as every other body of every JSON route is, not how its
    body failed."""
    return await http_exception_handler(request, unauthorized())


def _shown(err: dict[str, Any]) -> dict[str, Any]:
    """One validation error as the body shows it."""
    loc, msg = err.get("loc", ()), safe(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "json_invalid":  # FastAPI puts the parser's character position in `loc`
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        loc, msg = ("body",), f"not valid JSON ({safe((err.get('ctx') or {}).get('error', msg))}{where})"
    field, msg = placed(safe(field_name(loc)), msg)
    return {
        "field": field,
        "msg": msg,
        "type": safe(err.get("type", "value_error")),
        "loc": [safe(p) if isinstance(p, str) else p for p in loc],
    }


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own answer, except for a JSON body that is not UTF-8, nested past the parser's
    depth, or holding a value the parser refuses (an integer past Python's 4,300 digits): FastAPI's
    bare 400 names no field, and it is a body like any other that does not validate."""
    cause = exc.__cause__
    unreadable = isinstance(cause, (ValueError, RecursionError))  # UnicodeDecodeError is a ValueError
    if exc.status_code == status.HTTP_400_BAD_REQUEST and unreadable:
        if not await has_a_key(request):
            return await _keyless(request)
        if isinstance(cause, UnicodeDecodeError):
            why = f"not valid UTF-8 (byte {cause.start} of the body)"
        elif isinstance(cause, RecursionError):
            why = "not JSON that can be read (nested too deeply)"
        else:
            why = f"not JSON that can be read ({safe(str(cause))[:200]})"
        error = {"field": "body", "msg": why, "type": "json_invalid", "loc": ["body"]}
        return _problem(status.HTTP_422_UNPROCESSABLE_CONTENT, [error])
    listed = exc.detail if isinstance(exc.detail, list) else None
    if (
        exc.status_code == status.HTTP_422_UNPROCESSABLE_CONTENT
        and listed
        and all(isinstance(e, dict) and {"field", "msg"} <= e.keys() for e in listed)
    ):  # a route's own field errors (a fact write's): the shape of a body that does not validate
        return _problem(exc.status_code, listed)
    return await http_exception_handler(request, exc)


async def _rejected(request: Request, exc: TurnRejected) -> JSONResponse:
    batch = request.url.path.endswith(":batch")
    errors = [
        {
            "field": f"turns[{e.index}].{e.field}" if batch else e.field,
            "msg": safe(e.reason),
            "type": "value_error",
            "loc": ["body", "turns", e.index, e.field] if batch else ["body", e.field],
        }
        for e in exc.errors
    ]
    return _problem(status.HTTP_422_UNPROCESSABLE_CONTENT, errors)


async def _conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_409_CONFLICT, content={"detail": safe(exc)})


# What a client waits before trying a 503 again (an outage of the database, the broker or the
# resolver: the request stored nothing, or only what a retry under its idempotency key replays).
RETRY_AFTER_S = 5


async def _unavailable(request: Request, exc: EnqueueError | FilesUnwritable) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": safe(exc)},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database went away under a request, or the pool had no connection for it in time: a 503
    to retry, never a 500; the driver's text (hosts, users) stays in the log."""
    if rolled_back_for_a_conflict(exc):  # up, but this request's write met another's: not an outage
        logger.warning("%s %r: rolled back for a conflict", request.method, request.url.path, exc_info=exc)
        detail = "the request's write conflicted with another's and was rolled back; try again"
    else:
        # The path as repr: a client's control characters (%1b, decoded) never reach the log raw.
        logger.warning("%s %r: the database is unavailable", request.method, request.url.path, exc_info=exc)
        detail = "the database is unavailable for now; try again"
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": detail},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _grammar_busy(request: Request, exc: GrammarBusy) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": safe(exc)},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _bad_card(request: Request, exc: CardError) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": safe(exc)})


async def _other_embedder(request: Request, exc: EmbedderMismatch) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, content={"detail": safe(exc)})


async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # An upload the client broke off (a timeout, a cancelled page): nobody reads this answer, but it
    # is no server error (it was a 500, a traceback in the log and a 5xx in the metrics).
    logger.info(
        # %r, as _logged_500's: a path's escape sequences never reach the log raw
        "%s %r: the client closed the connection before its body was read",
        request.method,
        request.url.path,
    )
    return JSONResponse(status_code=status.HTTP_400_BAD_REQUEST, content={"detail": "the client went away"})


Handler = Callable[[Request, Any], Awaitable[Response]]


def _shaped(handler: Handler) -> Handler:
    """The handler, answering on the routes of OpenAI's API in OpenAI's error shape."""

    async def answer(request: Request, exc: Any) -> Response:
        response = await handler(request, exc)
        return openai_shaped(response) if openai_path(route_path(request.scope)) else response

    return answer


def install(app: FastAPI) -> None:
    """Register the handlers on the app."""
    handlers: list[tuple[type[Exception], Handler]] = [
        (RequestValidationError, _validation),
        (StarletteHTTPException, _http_error),
        (TurnRejected, _rejected),
        (IdempotencyConflict, _conflict),
        (EnqueueError, _unavailable),
        (FilesUnwritable, _unavailable),
        (CardError, _bad_card),
        (EmbedderMismatch, _other_embedder),
        (GrammarBusy, _grammar_busy),
        (ClientDisconnect, _client_gone),
        *((outage, _database_unavailable) for outage in DATABASE_OUTAGES),
    ]
    for exc_class, handler in handlers:
        app.add_exception_handler(exc_class, _shaped(handler))
