"""POST /v1/chat/completions for live turns (services/live_chat.py): OpenAI's `chat.completion`, or
with `stream: true` its `chat.completion.chunk` events and `[DONE]`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Header
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, json_body, needs
from api.errors import RETRY_AFTER_S
from api.openai_errors import error_body
from api.routes.turns import visible_turn
from api.sse import event_json, shutting_down, sse_response
from core.settings import settings
from db.models import TurnStatus
from db.session import DATABASE_OUTAGES
from services import live_chat
from services.live_chat import ChatNotSent, ChatRejected, ChatTurn
from services.producer import TurnView
from services.runs.openai_lines import failure_status, message_content
from services.schemas import HeaderText
from services.turn_wait import await_finished
from streaming.reader import turn_events
from structured.spec import GrammarBusy

router = APIRouter(tags=["chat"])
RESUME_AFTER_S = 1.0  # an unavailable stream is resumed after this long,
MAX_RESUMES = 120  # this many times in a row without a delta (an error that is no outage would resume on)


def _error(
    status_code: int,
    message: str,
    kind: str = "invalid_request_error",
    *,
    retry: bool = True,
    retry_after_s: int | None = None,
    code: str | None = None,
) -> JSONResponse:
    """OpenAI's error shape, which its client raises as the matching exception; `param` only when the
    message names a field. `retry=False` tells the official client not to retry the POST (a retry
    would queue another turn); `retry_after_s` how long it should wait first (its client honours
    `Retry-After`)."""
    headers = {} if retry else {"x-should-retry": "false"}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return JSONResponse(
        status_code=status_code,
        content=error_body(status_code, message, kind, code=code),
        headers=headers or None,
    )


@router.post("/v1/chat/completions", dependencies=[Depends(json_body("ingest"))], response_model=None)
async def chat_completions(
    body: Annotated[Any, Body()],
    who: Annotated[Caller, Depends(needs("ingest"))],
    conversation: Annotated[
        HeaderText | None, Header(alias=live_chat.CONVERSATION_HEADER, max_length=200)
    ] = None,
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> JSONResponse | EventSourceResponse:
    """A live turn through the queue; answers once it is stored, or streams it as it is written.
    `Idempotency-Key` makes a retry answer with the turn the first attempt queued."""
    try:
        turn = await run_in_threadpool(
            lambda: live_chat.start_chat_turn(
                body,
                api_key=who.key_id,
                tenant=who.tenant,
                conversation=conversation,
                idempotency_key=idempotency_key,
            )
        )
    except ChatRejected as exc:  # a 409 must not be retried: the same key would meet the same turn
        return _error(exc.status, str(exc), retry=exc.status != 409, code=exc.code)
    except GrammarBusy as exc:  # nothing stored: the client's own retry sends it again
        return _error(503, str(exc), "server_error", retry_after_s=RETRY_AFTER_S)
    except ChatNotSent as exc:  # stored, failed unsent: its conversation named all the same
        return _named(exc.conversation, _error(503, str(exc), "server_error", retry_after_s=RETRY_AFTER_S))

    return _named(turn.conversation, await _answer(turn, who))


async def _answer(turn: ChatTurn, who: Caller) -> JSONResponse | EventSourceResponse:
    """The chat turn's answer: its completion, its stream, or why there is none."""

    async def read() -> TurnView:
        return await run_in_threadpool(visible_turn, turn.id, who)

    if turn.stream:
        message = f"turn {turn.id}: the server is restarting; the turn goes on: read /v1/turns/{turn.id}"
        error = {"message": message, "type": "turn_error", "code": "unavailable"}
        farewell = {"data": event_json({"error": error})}
        return sse_response(_chunks(turn, read), on_shutdown=farewell)
    try:  # a database outage while waiting is read through; a 503 would be retried into a new turn
        view = await await_finished(
            read, settings.turn_wait_max_s, read_again_after=_database_error, stop=shutting_down
        )
    except DATABASE_OUTAGES:
        return _error(
            504,
            f"turn {turn.id} is queued but cannot be read for now; read it at /v1/turns/{turn.id}",
            "timeout",
            retry=False,
        )
    if not view.finished:
        # At shutdown too: the wait would hold the server's exit, cut by its supervisor's kill, and the
        # client would send the line again as a new turn (no 504 telling it not to).
        restarting = "the server is restarting; the turn goes on: " if shutting_down() else ""
        return _error(
            504,
            f"turn {turn.id} is still {view.status.value}; {restarting}read it at /v1/turns/{turn.id}",
            "timeout",
            retry=False,
        )
    if (
        view.status == TurnStatus.CANCELLED
    ):  # cancelled on purpose (DELETE, its run's cancel): no server fault
        said = f": {view.error}" if view.error else ""
        return _error(
            409, f"turn {view.id} was cancelled{said}", "turn_cancelled", retry=False, code="cancelled"
        )
    if view.status.value != "done":
        code = failure_status(view.error_code, 502)
        # its error_code, as a streamed failure's event and a batch's error file carry it (review)
        return _error(code, _why(view), "turn_failed", retry=False, code=view.error_code)
    return JSONResponse(live_chat.completion(turn, view))


# Printable ASCII goes as it is (an ASCII name the game sent in the request header comes back the
# same), but `%` and a space at either end (h11 refuses a header value that starts or ends with one,
# dropping the connection: review); the rest is percent-encoded UTF-8.
_AS_SENT = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _named(
    conversation: str, response: JSONResponse | EventSourceResponse
) -> JSONResponse | EventSourceResponse:
    """The answer, with its conversation's name in a header (review: a request naming none was
    answered in a `chat-…` conversation the game was never told of, which no erasure could name).
    Percent-encoded UTF-8, a space at either end too (h11 refuses a header value with one): decode
    it before sending it again or naming it in an erasure."""
    value = quote(conversation, safe=_AS_SENT)
    if value.startswith(" "):
        value = "%20" + value[1:]
    if value.endswith(" "):
        value = value[:-1] + "%20"
    response.headers[live_chat.CONVERSATION_HEADER] = value
    return response


def _database_error(exc: BaseException) -> bool:
    """A read that failed for the database's state, not for a bug: the turn is queued as ever."""
    return isinstance(exc, DATABASE_OUTAGES)


def _why(view: TurnView) -> str:
    return f"turn {view.id} {view.status.value} ({view.error_code}): {view.error}"


async def _chunks(turn: ChatTurn, read: Any):  # type: ignore[no-untyped-def]
    """OpenAI chunks from the turn's events; a restart or a failure ends the stream with an error
    object (the stored turn stays readable at /v1/turns/{id}). A `whole` turn's content comes in one
    chunk once stored: nothing was shown before, so a restart does not end it. An outage of the
    stream or the database is followed through: a chat client cannot resume a stream, so it is
    resumed here after the last delta sent, until the stream's longest."""
    yield {"data": event_json(live_chat.chunk(turn, {"role": "assistant", "content": ""}))}
    deadline = time.monotonic() + settings.stream_max_s
    last_id: str | None = None
    shown = ""  # the text sent up to `last_id`: a resume that finds no place in the stream goes on from it
    in_a_row = 0  # resumes since the last delta: an outage that does not pass ends the stream
    while True:
        resume, progressed = False, False
        async for chunk in _chunks_from(turn, read, last_id, deadline, shown):
            if chunk is None:  # unavailable for now: resume after the last delta sent
                resume = True
            elif isinstance(chunk, _Sent):
                last_id, shown, progressed = chunk.event_id, shown + chunk.text, True
            else:
                yield chunk
        if not resume:
            return
        in_a_row = 0 if progressed else in_a_row + 1
        if in_a_row > MAX_RESUMES:
            yield {
                "data": event_json(
                    {
                        "error": {
                            "message": f"turn {turn.id}: unavailable",
                            "type": "turn_error",
                            "code": "unavailable",  # as every other error chunk says its code
                        }
                    }
                )
            }
            return
        await asyncio.sleep(RESUME_AFTER_S)


@dataclass(frozen=True)
class _Sent:
    """A delta's event id and text, once its chunk was sent."""

    event_id: str
    text: str


async def _chunks_from(  # type: ignore[no-untyped-def]
    turn: ChatTurn, read: Any, last_id: str | None, deadline: float, shown: str
):
    """The chunks of the turn's events after `last_id` (after `shown`, the text sent up to it); a
    `_Sent` after each delta's chunk, and None when the stream is unavailable and may be resumed
    before `deadline`."""
    left = max(deadline - time.monotonic(), 0.0)
    resumed = shown if last_id is not None else None
    events = turn_events(
        turn.id, read, last_event_id=last_id, max_s=left, shown_text=resumed, latest_claim_only=True
    )
    async for event in events:
        if event.kind == "delta" and not turn.whole:
            yield {"data": event_json(live_chat.chunk(turn, {"content": event.data["text"]}))}
            if event.id is not None:
                yield _Sent(event.id, event.data["text"])
        elif event.kind == "delta" or (turn.whole and event.data.get("code") == "restarted"):
            continue
        elif event.kind == "done":
            if turn.whole:
                data = event.data
                content = message_content(data.get("reply"), data.get("structured"), data.get("params") or {})
                yield {"data": event_json(live_chat.chunk(turn, {"content": content}))}
            reason = "length" if (event.data.get("usage") or {}).get("finish_reason") == "length" else "stop"
            yield {"data": event_json(live_chat.chunk(turn, {}, reason))}
            if turn.include_usage:
                yield {"data": event_json(live_chat.usage_chunk(turn, event.data.get("usage")))}
            yield {"data": "[DONE]"}
            return
        elif event.data.get("code") == "unavailable" and time.monotonic() < deadline:
            yield None
            return
        else:
            message = f"turn {turn.id}: {event.data.get('code')}: {event.data.get('message')}"
            yield {
                "data": event_json(
                    {"error": {"message": message, "type": "turn_error", "code": event.data.get("code")}}
                )
            }
            return
